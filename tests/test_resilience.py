"""Stopping early on a signal or a time limit (agreed by every rank, saved, exit 0), checkpoint retention,
and their flags' refusals."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from himix_megatron.checkpoint import MANIFEST, LATEST, prune_checkpoints
from himix_megatron.config import ConfigError
from himix_megatron.training.config import check_stopping_and_retention, parse_args
from multiprocess import run_world
from test_training import _cfg, _losses, _parallel, _train, synthetic  # noqa: F401  (the fixture)


def _fake_checkpoints(root, iterations, newest, partial=()):
    for i in iterations:
        d = root / f"iter_{i:07d}"
        d.mkdir()
        if i not in partial:
            (d / MANIFEST).write_text("{}")
    (root / ".tmp-iter_0000099").mkdir()  # a save in progress
    (root / LATEST).write_text(f"iter_{newest:07d}")


def test_retention_keeps_multiples_the_last_k_and_the_newest(tmp_path):
    _fake_checkpoints(tmp_path, [10, 20, 30, 40, 50, 60, 70], newest=70, partial=[30])
    assert prune_checkpoints(str(tmp_path)) == []  # no rule, nothing deleted
    deleted = prune_checkpoints(str(tmp_path), retain_interval=40, keep_last=2)
    assert deleted == ["iter_0000010", "iter_0000020", "iter_0000050"]
    left = sorted(os.listdir(tmp_path))
    # multiples of 40, the 2 newest, the partial one (not a candidate) and the save in progress remain
    assert left == [".tmp-iter_0000099", "iter_0000030", "iter_0000040", "iter_0000060", "iter_0000070", "latest"]
    assert prune_checkpoints(str(tmp_path), keep_last=1) == ["iter_0000040", "iter_0000060"]


def test_a_failed_deletion_is_logged_not_fatal(tmp_path, monkeypatch, caplog):
    import shutil

    _fake_checkpoints(tmp_path, [1, 2, 3], newest=3)

    def refuse(path, *a, **k):
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr(shutil, "rmtree", refuse)
    assert prune_checkpoints(str(tmp_path), keep_last=1) == []
    assert "could not delete" in caplog.text and "iter_0000001" in caplog.text


@pytest.mark.parametrize("extra, message", [
    (["--exit-signal-handler", "--exit-signal", "SIGNOPE", "--save", "s"], "--exit-signal 'SIGNOPE' is not a signal"),
    (["--exit-signal-handler", "--exit-signal", "SIGKILL", "--save", "s"], "--exit-signal SIGKILL cannot be caught"),
    (["--exit-signal-handler"], "--exit-signal-handler needs --save"),
    (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins 0.0 must be positive"),
    (["--save", "s", "--save-interval", "10", "--save-retain-interval", "25"],
     "--save-retain-interval 25 is not a multiple of --save-interval 10"),
    (["--save-retain-interval", "20"], "--save-retain-interval needs --save and --save-interval"),
    (["--save-keep-last", "0", "--save", "s"], "--save-keep-last needs --save and a count >= 1"),
    (["--async-save"], "--async-save needs --save"),
])
def test_stopping_and_retention_flags_are_checked(extra, message):
    cfg = parse_args(["--train-iters", "1", *extra])
    with pytest.raises(ConfigError, match=message):
        check_stopping_and_retention(cfg)


@pytest.mark.slow
def test_sigterm_stops_every_rank_at_one_iteration_and_the_resume_is_exact(synthetic, tmp_path):  # noqa: F811
    """DP=2, distributed optimizer: rank 0 alone gets SIGTERM after step 4; both ranks finish that step,
    save iteration 4 and return; resuming from it gives the uninterrupted run's losses 5-6."""
    cfg = _cfg(synthetic, global_batch_size=16, use_distributed_optimizer=True, train_iters=6,
               save=str(tmp_path / "full"))
    full = run_world(2, _parallel(cfg), _train, cfg)
    signalled = dataclasses.replace(cfg, save=str(tmp_path / "run"), exit_signal_handler=True, inject_signal_at=4)
    stopped = run_world(2, _parallel(cfg), _train, signalled)
    assert [r["stopped"] for r in stopped] == ["SIGTERM received"] * 2
    assert [r["iteration"] for r in stopped] == [4, 4]
    assert open(tmp_path / "run" / "latest").read().strip() == "iter_0000004"
    assert not (tmp_path / "run" / "DONE").exists() and (tmp_path / "full" / "DONE").exists()
    resumed = run_world(2, _parallel(cfg), _train, dataclasses.replace(cfg, save=str(tmp_path / "run"),
                                                                        load=str(tmp_path / "run")))
    assert [h["iteration"] for h in resumed[0]["history"]] == [5, 6]
    torch.testing.assert_close(torch.tensor(_losses(stopped[0]) + _losses(resumed[0]), dtype=torch.float64),
                               torch.tensor(_losses(full[0]), dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_exit_duration_and_retention_in_a_run(synthetic, tmp_path):  # noqa: F811
    cfg = _cfg(synthetic, train_iters=8, save=str(tmp_path / "run"), save_interval=1, save_retain_interval=4,
               save_keep_last=2)
    [result] = run_world(1, _parallel(cfg), _train, cfg)
    assert sorted(d for d in os.listdir(tmp_path / "run") if d.startswith("iter_")) == \
        ["iter_0000004", "iter_0000007", "iter_0000008"]
    timed = dataclasses.replace(cfg, save=str(tmp_path / "timed"), exit_duration_in_mins=1e-6, save_interval=None,
                                save_retain_interval=None, save_keep_last=None)
    [stopped] = run_world(1, _parallel(timed), _train, timed)
    assert stopped["iteration"] == 1 and "--exit-duration-in-mins" in stopped["stopped"]
    assert open(tmp_path / "timed" / "latest").read().strip() == "iter_0000001"
