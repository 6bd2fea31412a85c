"""tools/bench_loader.py runs end to end (tiny settings; the real figures come from a manual run)."""

from __future__ import annotations

import os
import re
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_loader_smoke(monkeypatch, capsys):
    argv = ["bench_loader.py", "--samples", "16", "--workers", "1", "--source-size", "64x48", "--image-size", "32",
            "--aspect-ratio", "pad", "--micro-batch-size", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(REPO, "tools", "bench_loader.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(r"inline \(1 core, no DataLoader\): +[\d.]+ samples/s", out)
    assert re.search(r"ShardLoader workers=1: +[\d.]+ samples/s total, +[\d.]+ per worker", out)
