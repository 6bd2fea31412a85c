"""Fault campaign: kill a small TP=2 training run at random moments and check that every resume is exact.

    python tools/fault_campaign.py [--trials 20] [--sigterm-every 4] [--async-every 2] [--iters 8] [--seed 0]
                                   [--workdir DIR]

One uninterrupted reference run first: `himix-train` under torchrun, TP=2, the distributed optimizer, a
checkpoint after every step, tiny model on synthetic data. Then each trial starts the same run afresh and
  - SIGKILL trials: SIGKILL one worker rank at a random moment after a random step (in the next step or in
    the save after it), then
    resume with `--load` and run to the end;
  - SIGTERM trials (every --sigterm-every-th): SIGTERM the torchrun agent (as SLURM or a preemption would)
    under `--exit-signal-handler`: every rank finishes its step, saves and exits 0; then resume.
Every --async-every-th trial (counting from the first) saves with `--async-save`: the save of a step is then
written while the next step runs, so a kill in a step often lands in a background write.
A trial counts as an exact resume when the resumed run loads a complete checkpoint and its losses equal the
reference's for every iteration after it (|diff| <= 1e-6, as tests/test_training.py asks of a resume).
It prints, per trial and in total: exact resumes, failed loads, iterations lost (the steps logged before the
fault minus the iteration resumed from; a SIGTERM trial must lose none), and the processes of the trial left
alive after the run ended (which are then killed).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
LOSS = re.compile(r"^iteration\s+(\d+) \| loss ([\d.]+)")
LOADED = re.compile(r"^loaded (\S+) .*resuming at iteration (\d+)")


@dataclass
class Trial:
    number: int
    fault: str  # "SIGKILL rank N at T s" / "SIGTERM at T s"
    logged_before: int  # last iteration the faulted run logged
    resumed_from: int | None  # iteration the resume loaded (None: it failed to load)
    exact: bool
    leftover: int  # processes of the faulted run alive after it ended
    note: str = ""
    background: bool = False  # --async-save

    @property
    def lost(self) -> int | None:
        return None if self.resumed_from is None else self.logged_before - self.resumed_from


def data(workdir: str) -> tuple[str, str]:
    from himix_megatron.data.synthetic import SyntheticConfig, generate, write_word_tokenizer

    train, tok = os.path.join(workdir, "data", "train"), os.path.join(workdir, "data", "tok")
    if not os.path.exists(os.path.join(train, "index.json")):
        generate(SyntheticConfig(num_samples=400, seed=0, maxcount=100), train)
        write_word_tokenizer(tok)
    return train, tok


def command(train: str, tok: str, save: str, iters: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", "0", "-m", "himix_megatron.train", "--tensor-model-parallel-size", "2",
            "--use-distributed-optimizer", "--data-path", train, "--tokenizer-model", tok, "--system-prompt", "",
            "--seq-length", "24", "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", str(iters),
            "--lr", "3e-3", "--lr-warmup-fraction", "0.2", "--num-workers", "0", "--log-interval", "1",
            "--no-progress", "--save", save, "--save-interval", "1", *extra]


def losses(text: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in map(LOSS.match, text.splitlines()) if m}


def group_alive(pgid: int) -> list[int]:
    """PIDs still in the process group a trial's run was started in."""
    import psutil

    alive = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.pid != os.getpid():
                alive.append(p.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return alive


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _workers(pid: int) -> list:
    import psutil

    found = []  # torchrun's own children: the ranks (their forked checkpoint writers share the command line)
    for child in psutil.Process(pid).children(recursive=False):
        try:
            if "himix_megatron.train" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # exited meanwhile (or a zombie)
            continue
    return found


def run_faulted(cmd: list[str], log: str, fault: str, after: int, delay: float) -> tuple[str, int, str]:
    """Start `cmd` in its own session; once it has logged iteration `after`, wait `delay` seconds (into the
    next step or the save after it) and apply the fault. (log text, leftover processes, what was done)."""
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        seen = {}  # every descendant of the run: what must be gone once it has ended

        def watch():
            for child in _descendants(proc.pid):
                seen.setdefault(child.pid, child)

        while proc.poll() is None and max(losses(open(log, encoding="utf-8").read()), default=0) < after:
            watch()
            time.sleep(0.02)
        end = time.monotonic() + delay
        while time.monotonic() < end and proc.poll() is None:
            watch()
            time.sleep(0.02)
        did = "run ended before the fault"
        if proc.poll() is None:
            if fault == "SIGKILL":
                workers = _workers(proc.pid)
                if workers:
                    random.choice(workers).kill()
                    did = f"SIGKILL a worker {delay:.2f} s after step {after}"
            else:
                proc.send_signal(signal.SIGTERM)
                did = f"SIGTERM torchrun {delay:.2f} s after step {after}"
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            watch()
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            did += "; the run hung after the fault and was killed"
    time.sleep(2.0)  # let exiting children go
    alive = {p.pid: p for p in seen.values() if p.is_running() and p.status() != "zombie"}
    alive.update({pid: None for pid in group_alive(proc.pid)})
    leftover = sorted(alive)
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return open(log, encoding="utf-8").read(), len(leftover), did


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--sigterm-every", type=int, default=4, help="every N-th trial is a SIGTERM trial")
    p.add_argument("--async-every", type=int, default=2, help="every N-th trial, from the first, uses --async-save")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir")
    args = p.parse_args(argv)
    random.seed(args.seed)
    workdir = args.workdir or tempfile.mkdtemp(prefix="himix-faults-")
    os.makedirs(workdir, exist_ok=True)
    train, tok = data(workdir)

    start = time.monotonic()
    ref_log = os.path.join(workdir, "reference.log")
    with open(ref_log, "w", encoding="utf-8") as out:
        subprocess.run(command(train, tok, os.path.join(workdir, "reference"), args.iters), stdout=out,
                       stderr=subprocess.STDOUT, cwd=REPO, check=True)
    reference = losses(open(ref_log, encoding="utf-8").read())
    duration = time.monotonic() - start
    if sorted(reference) != list(range(1, args.iters + 1)):
        raise SystemExit(f"the reference run logged iterations {sorted(reference)}; see {ref_log}")
    step_seconds = 1.5 * duration / (args.iters + 4)  # a step and its save, startup counted as 4 steps
    print(f"reference: {args.iters} iterations in {duration:.0f} s, losses {reference[1]:.4f} -> "
          f"{reference[args.iters]:.4f}", flush=True)

    trials = []
    for n in range(1, args.trials + 1):
        fault = "SIGTERM" if args.sigterm_every and n % args.sigterm_every == 0 else "SIGKILL"
        save = os.path.join(workdir, f"trial{n}")
        shutil.rmtree(save, ignore_errors=True)
        background = bool(args.async_every) and (n - 1) % args.async_every == 0
        saving = ("--async-save",) if background else ()
        extra = (("--exit-signal-handler",) if fault == "SIGTERM" else ()) + saving
        # After a random step, and a random part of a step's time later: inside the next step, or inside the
        # save that follows every step.
        after, delay = random.randint(1, args.iters - 1), random.uniform(0.0, step_seconds)
        text, leftover, did = run_faulted(command(train, tok, save, args.iters, *extra),
                                          os.path.join(save + ".log"), fault, after, delay)
        before = max(losses(text), default=0)
        resumed_log = save + "-resume.log"
        with open(resumed_log, "w", encoding="utf-8") as out:
            resumed = subprocess.run(command(train, tok, save, args.iters, "--load", save, *saving), stdout=out,
                                     stderr=subprocess.STDOUT, cwd=REPO)
        rtext = open(resumed_log, encoding="utf-8").read()
        loaded = next((m for m in map(LOADED.match, rtext.splitlines()) if m), None)
        if resumed.returncode != 0:
            trials.append(Trial(n, did, before, None, False, leftover, f"resume exited {resumed.returncode}",
                                background))
        else:
            got = losses(rtext)
            start_at = int(loaded[2]) if loaded else 0
            exact = sorted(got) == list(range(start_at + 1, args.iters + 1)) and all(
                abs(got[i] - reference[i]) <= 1e-6 for i in got)
            trials.append(Trial(n, did, before, start_at, exact, leftover, background=background))
        t = trials[-1]
        print(f"trial {n:2d}: {t.fault + (' (async)' if background else ''):<48} logged {t.logged_before}, resumed from {t.resumed_from}, "
              f"{'exact' if t.exact else 'NOT EXACT'}, lost {t.lost}, leftover processes {t.leftover}"
              + (f" ({t.note})" if t.note else ""), flush=True)

    sigterm = [t for t in trials if t.fault.startswith("SIGTERM")]
    exact = sum(t.exact for t in trials)
    failed_loads = sum(t.resumed_from is None for t in trials)
    lost = [t.lost for t in trials if t.lost is not None]
    sigterm_lost = sum(t.lost or 0 for t in sigterm)
    print(f"{len(trials)} trials ({len(sigterm)} SIGTERM, {sum(t.background for t in trials)} with --async-save): {exact} exact resumes, {failed_loads} failed loads, "
          f"iterations lost {sum(lost)} in all (at most {max(lost, default=0)} in a trial; {sigterm_lost} in "
          f"SIGTERM trials), leftover processes {sum(t.leftover for t in trials)} "
          f"in {time.monotonic() - start:.0f} s")
    ok = exact == len(trials) and failed_loads == 0 and sigterm_lost == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
