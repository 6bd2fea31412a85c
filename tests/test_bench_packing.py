"""tools/bench_packing.py end to end at a toy size: its tables are printed and packing pads less than dynamic
padding, which pads less than padding to --seq-length.

Timing is not asserted: the machine is shared and the toy model is all overhead.
"""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # a subprocess: the benchmark initialises torch.distributed for itself
def test_bench_packing_prints_its_tables(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    report = tmp_path / "report.json"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_packing.py"), "--samples", "96", "--seq-length", "512",
         "--global-batch", "8", "--micro-batch", "4", "--steps", "1", "--warmup", "0", "--hidden", "64",
         "--layers", "1", "--heads", "4", "--kv-groups", "2", "--vocab", "1024", "--vision-tokens", "15",
         "--vision-width", "32", "--attention", "--json", str(report)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert re.search(r"text tokens per sample .*mean \d+, median \d+, p90 \d+, p99 \d+", text), text
    for cap in ("2", "4", "8", "16", "none"):
        assert re.search(rf"^ +{cap} +\d\.\d{{3}} +\d\.\d{{3}} +\d+\.\d\d ", text, re.M), f"cap {cap}:\n{text}"
    assert len(re.findall(r"packed \d+\.\d+ s, masked \d+\.\d+ s", text)) == 4, text
    number = r"\d+\.\d+"
    for arch in ("himix", "vanilla"):
        assert f"[{arch}] 1 steps x 8 samples" in text
    for mode in (r"\(a\) pad to seq-length", r"\(b\) dynamic padding", r"\(c\) packing"):
        assert len(re.findall(rf"^  {mode} +{number} +{number} +\d+ +{number}", text, re.M)) == 2, mode
    assert len(re.findall(rf"\(c\) over \(a\): speedup {number}x.*realization {number}", text)) == 2
    assert len(re.findall(rf"\(c\) over \(b\): speedup {number}x.*realization {number}", text)) == 2
    assert re.search(r"^packing: himix: padding efficiency .*vanilla: padding efficiency", text, re.M)
    assert re.search(r"wall time \d+ s$", text.strip())

    results = json.loads(report.read_text())["training"]
    for arch in ("himix", "vanilla"):
        pad, dyn, pack = (results[f"{arch}/{m}"] for m in ("pad", "dyn", "pack"))
        assert pad["samples"] == dyn["samples"] == pack["samples"] == 8
        assert pad["text_tokens"] == dyn["text_tokens"] == pack["text_tokens"]
        assert pack["efficiency"] > dyn["efficiency"] >= pad["efficiency"]
        assert pack["efficiency"] >= 0.95
        assert pack["computed_flops"] < dyn["computed_flops"] <= pad["computed_flops"]
        assert pack["samples_per_row"] > 1 == pad["samples_per_row"]
