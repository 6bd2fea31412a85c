"""W&B logging (training/wandb_run.py) in offline mode: nothing leaves the machine, and the offline run directory
(`run-ID.wandb`, W&B's record log) holds the metrics and the config. Also: the flags are refused without a
project or without wandb, a resume continues the W&B run whose id the checkpoint directory keeps, and a fresh
start is a new run."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import struct

import pytest

from data_utils import synthetic_training_data
from himix_megatron.config import ConfigError, ParallelConfig
from himix_megatron.training import wandb_run
from himix_megatron.training.config import TrainConfig
from multiprocess import run_world

BLOCK = 32768  # W&B's record log: LevelDB's log format, 32 KiB blocks of records with a 7-byte header


def wandb_records(path: str) -> list:
    """The protobuf Records of an offline run's `run-ID.wandb` file."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    records, pending, pos = [], b"", 7  # ":W&B", magic 0xBEE1, version
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding at the end of a block
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def offline_runs(save_dir) -> list[dict]:
    """Each offline run that wandb.init(dir=save_dir) wrote, in start order: its id, history {step: {key: value}}
    and config."""
    runs = []
    for run_dir in sorted(glob.glob(os.path.join(str(save_dir), "wandb", "offline-run-*"))):
        (log,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
        history, config, run_id = {}, {}, None
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history.setdefault(int(items.pop("_step")), {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")})
        runs.append({"id": run_id, "history": history, "config": config})
    return runs


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline, its settings and caches inside the test's directory (the spawned ranks inherit these)."""
    for name, value in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=tmp_path / "wandb-config",
                            WANDB_CACHE_DIR=tmp_path / "wandb-cache", WANDB_DATA_DIR=tmp_path / "wandb-data").items():
        monkeypatch.setenv(name, str(value))


def test_flags_are_refused_without_a_project_without_wandb_and_without_a_directory(monkeypatch):
    base = dict(data_path=["d"], train_iters=1)
    with pytest.raises(ConfigError, match="--wandb-exp-name needs --wandb-project"):
        wandb_run.check(TrainConfig(**base, wandb_exp_name="x", save="s"))
    with pytest.raises(ConfigError, match="--wandb-project needs --wandb-save-dir or --save"):
        wandb_run.check(TrainConfig(**base, wandb_project="p"))
    wandb_run.check(TrainConfig(**base, wandb_project="p", save="s"))
    wandb_run.check(TrainConfig(**base))  # no flag, nothing needed
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"--wandb-project needs the wandb package.*himix_megatron\[wandb\]"):
        wandb_run.check(TrainConfig(**base, wandb_project="p", save="s"))


def test_a_resume_continues_the_run_the_checkpoint_directory_keeps(offline, tmp_path):
    """Fresh starts get new ids; a resume takes the id from --load's directory (else --save's) and writes it to
    --save; a record of another project is not continued."""
    def writer(resumed, **flags):
        cfg = TrainConfig(**{"data_path": ["d"], "train_iters": 1, "wandb_project": "p", **flags})
        w = wandb_run.WandbWriter(cfg, {"lr": 0.5}, resumed=resumed)
        w.log({"train/loss": 1.0}, 1)
        w.close()
        return w

    first = writer(False, save=str(tmp_path / "a"))
    assert json.loads((tmp_path / "a" / wandb_run.RUN_FILE).read_text())["id"] == first.id
    again = writer(False, save=str(tmp_path / "a"))  # a fresh start in the same directory: a new run
    assert again.id != first.id and not again.resumed
    resumed = writer(True, load=str(tmp_path / "a"), save=str(tmp_path / "b"))
    assert resumed.id == again.id and resumed.resumed
    assert json.loads((tmp_path / "b" / wandb_run.RUN_FILE).read_text())["id"] == again.id
    elsewhere = writer(True, load=str(tmp_path / "b"), save=str(tmp_path / "b"), wandb_project="q")
    assert elsewhere.id != again.id and not elsewhere.resumed
    (tmp_path / "a" / wandb_run.RUN_FILE).write_text("[]")
    with pytest.raises(ConfigError, match="wandb_run.json: not a W&B run record"):
        writer(True, load=str(tmp_path / "a"), save=str(tmp_path / "c"))
    assert offline_runs(tmp_path / "a" / "wandb")[0]["history"] == {1: {"train/loss": 1.0}}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_training_data(tmp_path_factory.mktemp("synthetic"), 200, valid=300, maxcount=100)


def _train(cfg: TrainConfig):
    from himix_megatron.training.trainer import train

    return train(cfg)


def tensorboard_scalars(tb_dir) -> dict:
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    scalars = {}
    for path in sorted(glob.glob(os.path.join(str(tb_dir), "events.out.tfevents.*"))):
        for event in LegacyEventFileLoader(path).Load():
            for value in event.summary.value:
                scalars.setdefault(event.step, {})[value.tag] = value.simple_value
    return scalars


@pytest.mark.slow
def test_offline_run_holds_the_tensorboard_scalars_and_the_config_and_a_resume_continues_it(
        synthetic, offline, tmp_path):
    """DP=2: the last rank logs every TensorBoard scalar to W&B too (timers and memory included), with the full
    config; the resume from iteration 2 continues the same W&B run at iterations 3 and 4."""
    save = tmp_path / "run"
    cfg = TrainConfig(data_path=[str(synthetic / "train")], valid_data_path=[str(synthetic / "valid")],
                      tokenizer_model=str(synthetic / "tok"), system_prompt="", seq_length=24, micro_batch_size=2,
                      global_batch_size=8, lr=3e-3, train_iters=4, num_workers=0, progress=False, log_interval=1,
                      eval_interval=2, eval_iters=1, save=str(save), save_interval=2,
                      tensorboard_dir=str(tmp_path / "tb"),
                      wandb_project="himix-test", wandb_exp_name="offline", log_timers_to_tensorboard=True,
                      timing_log_level=1, log_memory_to_tensorboard=True)
    parallel = ParallelConfig(1, 1)
    full = run_world(2, parallel, _train, cfg)
    (first,) = offline_runs(save / "wandb")
    assert first["id"] == json.loads((save / wandb_run.RUN_FILE).read_text())["id"]
    assert first["config"]["wandb_exp_name"] == "offline" and first["config"]["lr"] == 3e-3
    assert first["config"]["model_description"]["arch"] == "himix" and first["config"]["data_parallel_size"] == 2
    assert first["config"]["train_iters"] == 4 and first["config"]["start_iteration"] == 0
    history = first["history"]
    assert sorted(history) == [1, 2, 3, 4]
    for step, record in history.items():
        assert math.isclose(record["train/loss"], full[0]["history"][step - 1]["loss"], rel_tol=1e-6)
        for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/model_tflops_per_s",
                    "train/padding_efficiency", "train/samples_per_row", "train/skipped_steps",
                    "train/skipped_samples", "train/dropped_samples", "forward-backward-time", "optimizer-time",
                    "iteration-time", "mem-rss-bytes", "mem-max-rss-bytes"):
            assert key in record, (step, key)
        assert record["mem-max-rss-bytes"] >= record["mem-rss-bytes"] > 0
    # The save after iteration 2's log line falls in iteration 3's interval; forward-compute is level 2.
    assert "save-checkpoint-time" in history[3] and "forward-compute-time" not in history[3]
    assert math.isclose(history[4]["valid/loss"], full[0]["valid_loss"], rel_tol=1e-6)
    # The same scalars, under the same names, as TensorBoard (float32 there).
    tensorboard = tensorboard_scalars(tmp_path / "tb")
    assert sorted(tensorboard) == sorted(history)
    for step in history:
        assert set(tensorboard[step]) == set(history[step])
        for key, value in history[step].items():
            assert math.isclose(tensorboard[step][key], value, rel_tol=1e-6, abs_tol=1e-6), (step, key)

    # --load DIR/iter_N --save ELSEWHERE: the id comes from the checkpoint's directory.
    resumed_cfg = dataclasses.replace(cfg, load=str(save / "iter_0000002"), save=str(tmp_path / "resumed"))
    resumed = run_world(2, parallel, _train, resumed_cfg)
    (second,) = offline_runs(tmp_path / "resumed" / "wandb")
    assert second["id"] == first["id"] and sorted(second["history"]) == [3, 4]
    assert second["config"]["start_iteration"] == 2
    for step in (3, 4):
        assert math.isclose(second["history"][step]["train/loss"], resumed[0]["history"][step - 3]["loss"],
                            rel_tol=1e-6)
