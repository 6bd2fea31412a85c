"""tools/bench.py end to end at a toy size: every figure is printed and the last line is `realized: X`.

Timing is not asserted: the machine is shared and the toy model is all overhead.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # subprocesses: the benchmark and its fresh-process memory probes
def test_bench_prints_every_figure():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench.py"), "--hidden", "64", "--layers", "2", "--heads", "4",
         "--kv-groups", "2", "--vocab", "512", "--vision-width", "48", "--ratios", "15:8,15:16",
         "--repeats", "1", "--warmup", "0"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    lines = text.strip().splitlines()
    assert re.fullmatch(r"realized: \d+\.\d\d", lines[-1]), lines[-1]
    for ratio in ("15:8", "15:16"):
        assert f"V:L = {ratio}" in text
    number = r"\d+\.\d+"
    for pattern in (
        rf"himix +step median +{number} s",
        rf"vanilla +step median +{number} s",
        rf"speedup \(vanilla/himix time\): {number}x",
        rf"FLOP ratio \(vanilla/himix, finetune train step incl\. connector\): {number}x",
        rf"forward, paper Table 5 rule {number}x",
        rf"realization \(speedup / FLOP ratio\): {number}",
        rf"note: counted but not executed: himix {number} GFLOP .*vanilla ~{number} GFLOP",
        r"peak memory, RSS of a fresh process over 2 steps: himix \d+ MiB .*vanilla \d+ MiB",
        rf"saved for backward \(activations\): himix {number} MiB, vanilla {number} MiB",
    ):
        assert len(re.findall(pattern, text)) == 2, f"{pattern!r} not printed once per ratio:\n{text}"
    realizations = [float(x) for x in re.findall(rf"realization \(speedup / FLOP ratio\): ({number})", text)]
    assert float(lines[-1].split()[1]) == round(min(realizations), 2)


@pytest.mark.slow
def test_bench_baselines_prints_every_model():
    """tools/bench_baselines.py at a toy size: every model's row in both tables, and FLOP ratios that follow
    from himix_megatron.flops (HiMix cheapest, FastV 75% cheaper than 50%)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_baselines.py"), "--hidden", "128", "--layers", "5",
         "--ratio", "96:16", "--repeats", "1", "--new-tokens", "2", "--micro-batches", "1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {}
    for line in out.stdout.splitlines():
        m = re.match(r"  (\S.*?) +(\d+\.\d+) +(\d+\.\d+)x +(\d+\.\d+)x$", line)
        if m:
            rows.setdefault(m[1], []).append(float(m[4]))
    assert set(rows) == {"vanilla", "vanilla + gamma-MoD", "HiMix", "FastV K=2 R=50%", "FastV K=2 R=75%"}
    assert rows["vanilla"] == [1.0, 1.0] and len(rows["HiMix"]) == 2 and len(rows["vanilla + gamma-MoD"]) == 2
    assert rows["FastV K=2 R=75%"][0] > rows["FastV K=2 R=50%"][0] > 1.0
    assert min(rows["HiMix"]) > max(rows["FastV K=2 R=75%"][0], *rows["vanilla + gamma-MoD"])


@pytest.mark.slow
def test_bench_encoder_prints_every_figure():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_encoder.py"), "--vision-model", "tiny", "--repeats", "1",
         "--micro-batches", "1"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    for pattern in (r"HiMix from images +step +\d+\.\d+ s", r"HiMix from cached features +step +\d+\.\d+ s",
                    r"vanilla from images +step +\d+\.\d+ s", r"encoder share of the HiMix step from images: \d+%",
                    r"speedup from caching \(HiMix\): \d+\.\d+x", r"end to end, vanilla / HiMix: \d+\.\d+x"):
        assert re.search(pattern, out.stdout), (pattern, out.stdout)


@pytest.mark.slow
def test_bench_encoder_placement_prints_every_placement():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_encoder_placement.py"), "--vision-model", "tiny",
         "--vision-layers", "1", "--images", "1", "3", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^ +(\d+) +(\d+\.\d+) s +(\d+\.\d+)x +(\d+\.\d+) s +(\d+\.\d+)x$", out.stdout, re.M)
    assert [int(r[0]) for r in rows] == [1, 3], out.stdout
    assert all(float(r[2]) == 1.0 for r in rows)  # sharded is the reference column
    assert "sharded (E=2)" in out.stdout and "replicated (E=1)" in out.stdout
