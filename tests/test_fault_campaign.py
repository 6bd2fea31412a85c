"""tools/fault_campaign.py's short mode: a SIGKILL trial (with --async-save) and a SIGTERM trial of a TP=2 run (distributed
optimizer, a save every step) resume exactly, lose no completed step on SIGTERM, and leave no process."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_fault_campaign_short(tmp_path):
    proc = subprocess.run([sys.executable, "tools/fault_campaign.py", "--trials", "2", "--sigterm-every", "2",
                           "--iters", "5", "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    match = re.match(r"2 trials \(1 SIGTERM, 1 with --async-save\): 2 exact resumes, 0 failed loads, iterations lost (\d+) in all "
                     r"\(at most (\d+) in a trial; 0 in SIGTERM trials\), leftover processes 0", summary)
    assert match, summary
    # A save after every step: a SIGKILL loses at most the step being saved, and with --async-save also the
    # step during which the previous one was still being written.
    for line in proc.stdout.splitlines():
        trial = re.match(r"trial +\d+: .*?( \(async\))? +logged .* lost (\d+),", line)
        if trial:
            assert int(trial[2]) <= (2 if trial[1] else 1), line
