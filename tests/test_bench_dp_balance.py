"""tools/bench_dp_balance.py end to end at a toy size: the planner table, the length cost and the DP=2 run print,
and balancing lowers the planned imbalance. Timing is not asserted: the machine is shared."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"\d+\.\d{3}"


@pytest.mark.slow  # two spawned gloo ranks
def test_bench_dp_balance_prints_its_tables():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_dp_balance.py"), "--plan-steps", "30",
         "--length-samples", "6", "--global-batch", "8", "--steps", "2", "--warmup", "0", "--seq-length", "512",
         "--hidden", "64", "--layers", "1", "--vision-tokens", "15", "--vision-width", "32"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    rows = re.findall(rf"^ +(\d+) +(\d+) +(\d+) \| +({NUMBER}) \(({NUMBER})\) \| +({NUMBER}) \(({NUMBER})\) \| +"
                      rf"({NUMBER}) \(({NUMBER})\)$", text, re.M)
    assert len(rows) == 12, text  # 6 layouts x (HiMix, vanilla)
    for dp, gbs, per_rank, rr, _, equal, _, balanced, _ in rows:
        assert int(dp) * int(per_rank) == int(gbs)
        assert 1.0 <= float(balanced) <= float(equal) <= float(rr)
    assert len(re.findall(r"^ +\d+ +\d+ \| +\d+\.\d ms \| +\d+\.\d ms \| +\d+%$", text, re.M)) == 6, text
    assert re.search(rf"^ round-robin \| +{NUMBER} \| +{NUMBER} s \| +\d+\.\d\d s$", text, re.M), text
    assert re.search(rf"^ +balanced \| +{NUMBER} \| +{NUMBER} s \| +\d+\.\d\d s$", text, re.M), text
    assert re.search(rf"step time: {NUMBER} measured, {NUMBER} predicted", text), text
