"""The trainer under every launcher it supports, end to end, plus checks that keep examples/ honest.

Slow tests (real processes, tiny synthetic data, TP=2 on two gloo ranks):
- torchrun across two "nodes" on this machine (c10d rendezvous);
- mpirun through the MPI bootstrap (mpi4py + mpich from the `mpi` extra);
- a worker killed by SIGKILL under `torchrun --max-restarts 1`: the restarted workers resume from the
  latest checkpoint and reproduce the uninterrupted run.
All runs use the same flags and seed, and CPU training is deterministic, so their losses must equal a
single-node torchrun run's. Losses are read from the TensorBoard event files (float32) because the log
line rounds them to four decimals.

Fast tests: `bash -n` on every example script; every long option in them belongs to the trainer's
parser or to the other tool the line calls (torchrun, srun/pyxis, convert_checkpoint.py, ...); and
examples/slurm/stage_config.py turns recipe stages into --config files the trainer's parser accepts.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from himix_megatron.platform import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
EXAMPLES = os.path.join(ROOT, "examples")
SLURM_DIR = os.path.join(EXAMPLES, "slurm")

ITERS, SAVE_INTERVAL = 20, 5
RUN_TIMEOUT = 300  # seconds per launch; a healthy run takes under a minute even on two busy cores

# Launcher variables of an enclosing job (CI under SLURM, a torchrun-launched pytest) would override
# the launcher under test in platform.discover_launch.
_LAUNCHER_ENV = re.compile(r"^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|MASTER_ADDR|MASTER_PORT|"
                           r"TORCHELASTIC_.*|SLURM_.*|PMI_.*|PMIX_.*|OMPI_.*|MPI_LOCALRANKID|HYDRA_.*)$")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not _LAUNCHER_ENV.match(k)}
    # torchrun sets OMP_NUM_THREADS=1 only for several local workers, mpirun never: the same thread
    # count everywhere keeps the CPU reductions, and so the losses, identical across launchers.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _executable(name: str) -> str:
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        path = shutil.which(name)
    assert path, f"{name} not found next to {sys.executable} or on PATH"
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data_utils import synthetic_training_data

    return synthetic_training_data(tmp_path_factory.mktemp("launch_data"), ITERS * 8 + 40)


def train_flags(data, run_dir) -> list[str]:
    return [
        "--tensor-model-parallel-size", "2", "--data-path", str(data / "train"), "--tokenizer-model", str(data / "tok"),
        "--system-prompt", "", "--seq-length", "24", "--micro-batch-size", "8", "--train-iters", str(ITERS),
        "--lr", "3e-3", "--seed", "1234", "--log-interval", "1", "--num-workers", "0", "--no-progress",
        "--save", str(run_dir / "ckpt"), "--load", str(run_dir / "ckpt"), "--save-interval", str(SAVE_INTERVAL),
        "--tensorboard-dir", str(run_dir / "tb"),
    ]


def _run(cmd: list[str], log_path) -> tuple[int, str]:
    """Run to completion with output in a file (two concurrent launchers cannot block on full pipes)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT)
        finally:
            _kill_tree(proc)
    with open(log_path) as f:
        return rc, f.read()


def _kill_tree(proc: subprocess.Popen) -> None:
    """Leave nothing behind from a launch that failed or timed out: torchrun puts its workers in
    sessions of their own, so they are found as descendants, not through the process group."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for pid in [proc.pid] + [p.pid for p in family]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def logged_losses(text: str) -> dict[int, float]:
    return {int(i): float(x) for i, x in re.findall(r"iteration\s+(\d+) \| loss ([0-9.]+|nan)", text)}


def event_files(tb_dir) -> list[str]:
    """In creation order: each (re)started last rank (TensorBoard's writer) writes its own file, named events.out.tfevents.<time>...."""
    files = glob.glob(os.path.join(str(tb_dir), "events.out.tfevents.*"))
    return sorted(files, key=lambda f: (int(os.path.basename(f).split(".")[3]), os.path.getmtime(f)))


def tb_losses(path: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    return {event.step: value.simple_value for event in LegacyEventFileLoader(path).Load()
            for value in event.summary.value if value.tag == "train/loss"}


def latest_iteration(save_dir) -> int:
    with open(os.path.join(str(save_dir), "latest")) as f:
        name = f.read().strip()
    with open(os.path.join(str(save_dir), name, "himix.json")) as f:
        meta = json.load(f)
    assert name == f"iter_{meta['iteration']:07d}"
    return meta["iteration"]


def assert_close(got: dict[int, float], want: dict[int, float], tol: float, what: str) -> float:
    assert sorted(got) == sorted(want), f"{what}: iterations {sorted(got)} != {sorted(want)}"
    worst = max(abs(got[i] - want[i]) for i in want)
    assert worst <= tol, f"{what}: max |loss difference| {worst:.3g} > {tol}: " + ", ".join(
        f"{i}: {got[i]!r} vs {want[i]!r}" for i in sorted(want) if abs(got[i] - want[i]) > tol)
    return worst


def assert_finished(run_dir, text: str) -> None:
    assert f"saved checkpoint at iteration {ITERS} to {run_dir / 'ckpt'}" in text
    assert latest_iteration(run_dir / "ckpt") == ITERS
    assert "TP=2 PP=1 DP=1" in text


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted single-node torchrun run: the losses every other launcher must reproduce, from
    the event file and as printed."""
    run_dir = tmp_path_factory.mktemp("reference")
    rc, text = _run([_executable("torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "himix_megatron.train",
                     *train_flags(data, run_dir)], run_dir / "log")
    assert rc == 0, text[-4000:]
    assert_finished(run_dir, text)
    (events,) = event_files(run_dir / "tb")
    losses, printed = tb_losses(events), logged_losses(text)
    assert sorted(losses) == list(range(1, ITERS + 1))
    assert_close(printed, losses, 5.1e-5, "log (4 decimals) vs event file")
    return {"losses": losses, "printed": printed}


@pytest.mark.slow
def test_torchrun_two_nodes(data, reference, tmp_path):
    """Two torchrun agents, one worker each, meet through c10d rendezvous; TP=2 spans the two "nodes".

    c10d assigns node ranks in order of arrival (torchrun ignores --node-rank outside the static
    backend), so both agents get identical command lines, as on a real cluster."""
    port = free_port()
    cmd = [_executable("torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"himix-test-{port}",
           "-m", "himix_megatron.train", *train_flags(data, tmp_path)]
    procs, logs = [], []
    try:
        for node in range(2):
            logs.append(open(tmp_path / f"node{node}.log", "w"))
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + RUN_TIMEOUT
        rcs = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            _kill_tree(p)
        for f in logs:
            f.close()
    texts = [(tmp_path / f"node{node}.log").read_text() for node in range(2)]
    assert rcs == [0, 0], "\n\n".join(t[-3000:] for t in texts)
    # Exactly one agent's worker is global rank 0 and logs; which one depends on who joined first.
    (text,) = [t for t in texts if "himix-train: himix" in t]
    assert_finished(tmp_path, text)
    losses = logged_losses(text)
    assert sorted(losses) == list(range(1, ITERS + 1))
    first, last = sum(losses[i] for i in (1, 2, 3)) / 3, sum(losses[i] for i in (18, 19, 20)) / 3
    assert last < 0.7 * first, f"the loss did not fall: {first:.4f} -> {last:.4f}"
    with open(os.path.join(tmp_path / "ckpt", f"iter_{ITERS:07d}", "himix.json")) as f:
        assert json.load(f)["parallel"]["world_size"] == 2
    worst = assert_close(tb_losses(event_files(tmp_path / "tb")[-1]), reference["losses"], 1e-6,
                         "two-node torchrun")
    print(f"two-node torchrun: losses {first:.4f} -> {last:.4f}; max |difference| from single node {worst:.3g}")


@pytest.mark.slow
def test_mpirun(data, reference, tmp_path):
    """`mpirun -np 2 himix-train ...`: rank and world from MPI, rank 0's port broadcast through mpi4py."""
    pytest.importorskip("mpi4py")
    rc, text = _run([_executable("mpirun"), "-np", "2", _executable("himix-train"), *train_flags(data, tmp_path)],
                    tmp_path / "log")
    assert rc == 0, text[-4000:]
    assert_finished(tmp_path, text)
    (events,) = event_files(tmp_path / "tb")
    worst = assert_close(tb_losses(events), reference["losses"], 1e-6, "mpirun")
    print(f"mpirun: {ITERS} losses, max |difference| from torchrun {worst:.3g}")


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker(data, reference, tmp_path):
    """SIGKILL one worker after the first checkpoint: torchrun restarts the group, which resumes there."""
    import psutil

    save = tmp_path / "ckpt"
    cmd = [_executable("torchrun"), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           "-m", "himix_megatron.train", *train_flags(data, tmp_path)]
    # By default the workers meet in a store the agent keeps for its whole life, where the killed
    # workers' gloo/NCCL addresses stay behind, and the restarted ones connect to those and fail
    # (pytorch/pytorch#167288). The opt-out gives every attempt a fresh store, as the examples do.
    env = dict(_env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    with open(tmp_path / "log", "w") as log:
        agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while not os.path.exists(save / "latest"):
                assert agent.poll() is None, "torchrun exited before the first checkpoint"
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.02)
            # torchrun starts its workers as `python -u -m himix_megatron.train`; any further
            # descendants (dist_checkpointing helpers) are theirs, not torchrun's.
            workers = [p for p in psutil.Process(agent.pid).children()
                       if "himix_megatron.train" in " ".join(p.cmdline())]
            assert len(workers) == 2, [p.cmdline() for p in workers]
            killed_after = latest_iteration(save)
            workers[-1].send_signal(signal.SIGKILL)
            rc = agent.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            _kill_tree(agent)
    text = (tmp_path / "log").read_text()
    assert rc == 0, text[-4000:]
    resumed = re.findall(r"loaded \S+ \(.*\): resuming at iteration (\d+)", text)
    assert len(resumed) == 1, f"expected one resume, got {resumed}\n" + text[-4000:]
    start = int(resumed[0])
    assert start >= killed_after and start % SAVE_INTERVAL == 0 and start < ITERS, (start, killed_after)
    assert_finished(tmp_path, text)

    # The first attempt logged up to the kill; the restarted one from `start + 1` on.
    first_attempt, restarted = event_files(tmp_path / "tb")
    assert min(tb_losses(first_attempt)) == 1
    after = tb_losses(restarted)
    want = {i: x for i, x in reference["losses"].items() if i > start}
    worst = assert_close(after, want, 1e-5, f"resumed at {start}")
    printed = logged_losses(text.split("resuming at iteration", 1)[1])
    assert printed == {i: x for i, x in reference["printed"].items() if i > start}
    print(f"killed a worker after checkpoint {killed_after}; resumed at {start}; iterations {start + 1}-{ITERS} "
          f"match the uninterrupted run to {worst:.3g}")


# --- examples/ -------------------------------------------------------------------------------------


def example_scripts() -> list[str]:
    scripts = sorted(glob.glob(os.path.join(EXAMPLES, "train_*.sh")) + glob.glob(os.path.join(SLURM_DIR, "*.sh"))
                     + glob.glob(os.path.join(SLURM_DIR, "*.sbatch")))
    assert scripts, "no example launch scripts found"
    return scripts


@pytest.mark.parametrize("script", glob.glob(os.path.join(SLURM_DIR, "*.sbatch")), ids=os.path.basename)
def test_slurm_scripts_prune_checkpoints_and_save_in_the_background(script):
    """Long jobs keep a bounded number of checkpoints, with a retain interval the trainer accepts (a multiple
    of the save interval), and write them with --async-save."""
    from himix_megatron.training.config import TrainConfig, check_stopping_and_retention

    text = "\n".join(line.split(" #", 1)[0] for line in open(script).read().splitlines()
                     if not line.lstrip().startswith("#"))
    flags = {name: re.findall(rf"--{name} (\d+)", text) for name in ("save-interval", "save-keep-last",
                                                                      "save-retain-interval")}
    assert all(len(set(values)) == 1 for values in flags.values()), flags
    assert "--async-save" in text
    interval, keep, retain = (int(values[0]) for values in flags.values())
    assert keep >= 2, "keep the checkpoint a resume falls back to"
    check_stopping_and_retention(TrainConfig(data_path=["d"], save="s", save_interval=interval, save_keep_last=keep,
                                             save_retain_interval=retain, async_save=True))


@pytest.mark.parametrize("script", example_scripts(), ids=os.path.basename)
def test_example_script_syntax(script):
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


LONG_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
# srun's and pyxis's own options, which have no parser here to ask.
SRUN_OPTIONS = {"--container-image", "--container-mounts", "--container-workdir", "--no-container-mount-home",
                "--nodes", "--ntasks", "--ntasks-per-node", "--kill-on-bad-exit"}


def _options_in(text: str) -> set[str]:
    """Every long option outside comments (#SBATCH lines are sbatch's, not a command's)."""
    return {flag for line in text.splitlines() if not line.lstrip().startswith("#")
            for flag in LONG_OPTION.findall(line.split(" #", 1)[0])}


def _load(path: str, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _help_options(main, argv) -> set[str]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(argv)
    return set(LONG_OPTION.findall(out.getvalue()))


def test_example_flags_exist():
    """Each long option in the scripts belongs to the trainer or to the other tool the scripts call."""
    from torch.distributed.run import get_args_parser

    from himix_megatron.data import synthetic
    from himix_megatron.training.config import build_parser

    trainer = {opt for action in build_parser()._actions for opt in action.option_strings}
    others = (SRUN_OPTIONS
              | {opt for action in get_args_parser()._actions for opt in action.option_strings}
              | _help_options(_load(os.path.join(ROOT, "tools", "convert_checkpoint.py"), "convert_checkpoint").main,
                              ["import", "--help"])
              | _help_options(_load(os.path.join(SLURM_DIR, "stage_config.py"), "stage_config").main, ["--help"])
              | _help_options(synthetic.main, ["--help"]))
    used = set()
    for script in example_scripts():
        with open(script) as f:
            used |= _options_in(f.read())
    unknown = sorted(used - trainer - others)
    assert not unknown, f"options in examples/ that neither himix-train nor the other tools accept: {unknown}"
    assert {"--tensor-model-parallel-size", "--use-distributed-optimizer", "--config", "--save", "--load"} <= used


def test_example_stage_config(data, tmp_path):
    """stage_config.py turns a recipe stage into a --config file that the trainer reads as is."""
    import yaml

    from himix_megatron.training.config import parse_args

    # A recipe shaped like examples/recipes/*.yaml whose datasets are copies of the synthetic shards.
    for d in ("a", "b"):
        shutil.copytree(data / "train", tmp_path / "root" / d)
    with open(tmp_path / "recipe.yaml", "w") as f:
        yaml.safe_dump({"name": "t", "common": {"optimizer": "adamw", "weight_decay": 0.0, "lr_schedule": "cosine",
                                                "warmup_ratio": 0.03, "precision": "bf16", "seq_length": 2048,
                                                "vision": "siglip-so400m-384"},
                        "stages": [
                            {"name": "pretrain", "trainable": "himix_vision", "template": "pretrain", "lr": 1e-3,
                             "global_batch_size": 256, "epochs": {"default": 3, "tiny": 2},
                             "datasets": [{"name": "a", "shards": "a"}]},
                            {"name": "further_pretrain", "trainable": "lm_and_himix_vision", "template": "tinyllama",
                             "lr": 2e-5, "global_batch_size": 128, "epochs": 1,
                             "datasets": [{"name": "a", "shards": "a"}, {"name": "b", "shards": "b", "fraction": 0.25}]},
                        ]}, f)
    stage_config = _load(os.path.join(SLURM_DIR, "stage_config.py"), "stage_config")
    n = ITERS * 8 + 40
    a, b = str(tmp_path / "root" / "a"), str(tmp_path / "root" / "b")
    expected = {
        "pretrain": dict(stage="pretrain", template="pretrain", lr=1e-3, global_batch_size=256, train_epochs=2.0,
                         train_samples=None, data_path=[a]),
        # Weights fraction x size, and one pass = the sampled share of each dataset.
        "further_pretrain": dict(stage="further-pretrain", template="tinyllama", lr=2e-5, global_batch_size=128,
                                 train_epochs=None, train_samples=n + n // 4,
                                 data_path=[str(float(n)), a, str(n * 0.25), b]),
    }
    for stage, want in expected.items():
        out = str(tmp_path / f"{stage}.yaml")
        assert stage_config.main(["--recipe", str(tmp_path / "recipe.yaml"), "--stage-name", stage, "--data-root",
                                  str(tmp_path / "root"), "--language-model", "tiny", "--output", out]) == 0
        cfg = parse_args(["--config", out, "--micro-batch-size", "4"])  # flags override the file
        got = {key: getattr(cfg, key) for key in want}
        got["data_path"] = [str(x) for x in got["data_path"]]
        assert got == want
        assert (cfg.bf16, cfg.seq_length, cfg.lr_decay_style, cfg.lr_warmup_fraction, cfg.weight_decay,
                cfg.micro_batch_size) == (True, 2048, "cosine", 0.03, 0.0, 4)


@pytest.mark.parametrize("recipe", sorted(glob.glob(os.path.join(EXAMPLES, "recipes", "*.yaml"))), ids=os.path.basename)
def test_example_recipes_have_trainer_stages(recipe, tmp_path):
    """Every stage of the shipped recipes maps to a trainer stage (those without fractions need no data)."""
    from himix_megatron.data.recipes import load_recipe

    stage_config = _load(os.path.join(SLURM_DIR, "stage_config.py"), "stage_config")
    for st in load_recipe(recipe)["stages"]:
        if any("fraction" in d for d in st["datasets"]):
            continue  # needs the real shard sizes
        cfg = stage_config.stage_config(recipe, st["name"], str(tmp_path), "default")
        assert cfg["stage"] in ("pretrain", "further-pretrain", "finetune") and cfg["train_epochs"] >= 1
