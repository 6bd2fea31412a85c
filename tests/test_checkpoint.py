"""Checkpoint atomicity and verification: partial, truncated and crashed saves are never loaded."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest
import torch

from himix_megatron.checkpoint import (
    CheckpointError,
    ModelDescription,
    build_model,
    load_checkpoint,
    read_description,
    resolve,
    save_checkpoint,
)
from himix_megatron.config import ParallelConfig
from model_utils import TINY_LM, TINY_VISION

DESCRIPTION = ModelDescription("himix", TINY_LM, TINY_VISION, "tinyllama")


@pytest.fixture
def saved(single_rank, tmp_path):
    """Two checkpoints, iterations 1 and 2, with different weights."""
    chunks, encoder = build_model(DESCRIPTION, ParallelConfig())
    for iteration in (1, 2):
        with torch.no_grad():
            chunks[0].decoder.final_layernorm.weight.fill_(float(iteration))
        save_checkpoint(str(tmp_path), chunks, DESCRIPTION, iteration=iteration, encoder=encoder,
                        train_state={"consumed_samples": 10 * iteration})
    return tmp_path


def _final_norm(load_dir) -> float:
    chunks, encoder = build_model(DESCRIPTION, ParallelConfig())
    load_checkpoint(load_dir, chunks, encoder=encoder)
    return float(chunks[0].decoder.final_layernorm.weight[0])


def test_latest_names_the_newest_and_loads(saved):
    assert open(saved / "latest").read().strip() == "iter_0000002"
    assert resolve(str(saved)) == str(saved / "iter_0000002")
    # The padded vocabulary is recorded, so the model reloads at any TP that divides it.
    assert read_description(str(saved)) == dataclasses.replace(DESCRIPTION, padded_vocab_size=256)
    assert _final_norm(str(saved)) == 2.0
    assert _final_norm(str(saved / "iter_0000001")) == 1.0


def _largest_file(iter_dir) -> str:
    files = [os.path.join(iter_dir, f) for f in os.listdir(iter_dir) if f.endswith(".distcp")]
    return max(files, key=os.path.getsize)


def test_truncated_checkpoint_is_refused_and_the_previous_one_used(saved, caplog):
    victim = _largest_file(saved / "iter_0000002")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(CheckpointError, match=f"{os.path.basename(victim)} has .* bytes, the manifest says"):
        resolve(str(saved / "iter_0000002"))  # named explicitly: no silent fallback
    with caplog.at_level(logging.ERROR):
        assert resolve(str(saved)) == str(saved / "iter_0000001")
    assert "truncated" in caplog.text
    assert _final_norm(str(saved)) == 1.0


def test_partial_checkpoint_without_manifest_is_refused(saved):
    os.remove(saved / "iter_0000002" / "manifest.json")
    with pytest.raises(CheckpointError, match="manifest.json is missing: the checkpoint is partial"):
        resolve(str(saved / "iter_0000002"))
    assert resolve(str(saved)) == str(saved / "iter_0000001")
    os.remove(saved / "iter_0000001" / "manifest.json")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve(str(saved))


def test_a_crash_mid_save_leaves_the_previous_checkpoint_current(saved, monkeypatch):
    from megatron.core import dist_checkpointing

    def crash(state, directory, *args, **kwargs):
        with open(os.path.join(directory, "__0_0.distcp"), "wb") as f:
            f.write(b"half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(dist_checkpointing, "save", crash)
    chunks, encoder = build_model(DESCRIPTION, ParallelConfig())
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(saved), chunks, DESCRIPTION, iteration=3, encoder=encoder)
    assert not (saved / "iter_0000003").exists()
    assert open(saved / "latest").read().strip() == "iter_0000002"
    assert resolve(str(saved)) == str(saved / "iter_0000002")
    monkeypatch.undo()
    save_checkpoint(str(saved), chunks, DESCRIPTION, iteration=3, encoder=encoder)  # cleans the debris
    assert resolve(str(saved)) == str(saved / "iter_0000003")
    assert not (saved / ".tmp-iter_0000003").exists()


def test_unknown_format_version_is_refused(saved):
    path = saved / "iter_0000002" / "himix.json"
    meta = json.loads(path.read_text())
    meta["format_version"] = 99
    path.write_text(json.dumps(meta))
    manifest = json.loads((saved / "iter_0000002" / "manifest.json").read_text())
    manifest["files"]["himix.json"] = os.path.getsize(path)
    (saved / "iter_0000002" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format_version 99"):
        resolve(str(saved / "iter_0000002"))


def test_missing_load_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve(str(tmp_path / "nowhere"))


def test_carried_files_do_not_change_what_latest_names(single_rank, tmp_path):
    """A checkpoint that carries files forward (an HF import's unused SigLIP tensors) still names itself in
    `latest`: the copy loop once reused the iteration directory's variable."""
    extra = tmp_path / "hf_vision_extra.safetensors"
    extra.write_bytes(b"tensors")
    chunks, encoder = build_model(DESCRIPTION, ParallelConfig())
    saved = save_checkpoint(str(tmp_path / "run"), chunks, DESCRIPTION, iteration=3, encoder=encoder,
                            extra_files={extra.name: str(extra)})
    assert open(tmp_path / "run" / "latest").read().strip() == "iter_0000003"
    assert open(os.path.join(saved, extra.name), "rb").read() == b"tensors"
