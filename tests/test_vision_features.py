"""Cached vision features (tools/cache_vision_features.py, himix-train --vision-features): training from fp32
features equals training from the images bit for bit, from bf16 features within bf16 rounding; a feature set
of another encoder, resolution or sample set is refused by name; the tool resumes shard by shard."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
import torch

from himix_megatron.checkpoint import ModelDescription
from himix_megatron.config import ParallelConfig
from himix_megatron.data.records import DataError
from model_utils import TINY_LM, TINY_VISION
from multiprocess import run_world
from test_training import _cfg, _losses, _parallel, _train, synthetic  # noqa: F401  (the fixture)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))


def _checkpoint(path, tok, seed):
    from himix_megatron.checkpoint import build_model, save_checkpoint

    torch.manual_seed(seed)
    description = ModelDescription("himix", TINY_LM, TINY_VISION, "tinyllama")
    chunks, encoder = build_model(description, ParallelConfig())
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape))  # every seed its own encoder
    save_checkpoint(path, chunks, description, iteration=1, encoder=encoder, tokenizer_dir=tok)


def _cache(argv):
    import cache_vision_features

    return cache_vision_features.main(argv + ["--no-progress"])


@pytest.fixture(scope="module")
def cached(synthetic, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("features")
    ckpts = {seed: str(root / f"ckpt{seed}") for seed in (0, 1)}
    for seed, path in ckpts.items():
        run_world(1, ParallelConfig(), _checkpoint, path, str(synthetic / "tok"), seed)
    train = str(synthetic / "train")
    for name, ckpt, dtype in (("fp32", ckpts[0], "float32"), ("bf16", ckpts[0], "bfloat16"),
                              ("other-encoder", ckpts[1], "float32")):
        run_world(1, ParallelConfig(), _cache, ["--load", ckpt, "--data-path", train, "--name", name,
                                                "--dtype", dtype, "--batch-size", "7"])
    return ckpts, train


@pytest.mark.slow
def test_training_from_cached_features_equals_training_from_images(synthetic, cached, tmp_path):  # noqa: F811
    ckpts, _ = cached
    cfg = _cfg(synthetic, load=ckpts[0], train_iters=4, global_batch_size=8)
    [images] = run_world(1, _parallel(cfg), _train, cfg)
    [fp32] = run_world(1, _parallel(cfg), _train, dataclasses.replace(cfg, vision_features="fp32"))
    [bf16] = run_world(1, _parallel(cfg), _train, dataclasses.replace(cfg, vision_features="bf16"))
    assert _losses(fp32) == _losses(images)  # bitwise: the same features reach the decoder
    torch.testing.assert_close(torch.tensor(_losses(bf16)), torch.tensor(_losses(images)), rtol=2e-2, atol=0)
    assert _losses(bf16) != _losses(images)  # ...but they are bf16's, not the images' own
    packed = dataclasses.replace(cfg, micro_batch_size=1, packing_seq_length=96)
    [packed_images] = run_world(1, _parallel(cfg), _train, packed)
    [packed_fp32] = run_world(1, _parallel(cfg), _train, dataclasses.replace(packed, vision_features="fp32"))
    assert _losses(packed_fp32) == _losses(packed_images)  # packed rows read [images, N, d_v] the same way


def _store(train, name, encoder_seed_ckpt=None, edit=None, aspect_ratio="resize"):
    """The trainer's FeatureStore for `name`, checked against the encoder of `encoder_seed_ckpt` (loaded here)."""
    from cache_vision_features import load_encoder

    from himix_megatron import platform
    from himix_megatron.training.config import TrainConfig
    from himix_megatron.training.data import vision_feature_store

    encoder = load_encoder(encoder_seed_ckpt, ParallelConfig())
    vision = encoder.vision if edit is None else dataclasses.replace(encoder.vision, **edit)
    cfg = TrainConfig(data_path=[train], vision_features=name, image_aspect_ratio=aspect_ratio)
    try:
        vision_feature_store(cfg, vision, encoder)
        return None
    except DataError as e:
        return str(e)
    finally:
        platform.shutdown()


@pytest.mark.slow
def test_mismatched_feature_sets_are_refused_by_name(cached, tmp_path):
    ckpts, train = cached
    [ok] = run_world(1, ParallelConfig(), _store, train, "fp32", ckpts[0])
    assert ok is None
    [other] = run_world(1, ParallelConfig(), _store, train, "other-encoder", ckpts[0])
    assert "computed by a different vision encoder" in other
    [size] = run_world(1, ParallelConfig(), _store, train, "fp32", ckpts[0], {"image_size": 70})
    assert "encoder.image_size is 56, this run's is 70" in size
    [pad] = run_world(1, ParallelConfig(), _store, train, "fp32", ckpts[0], None, "pad")
    assert "aspect_ratio" in pad and "'resize'" in pad and "'pad'" in pad, pad
    [missing] = run_world(1, ParallelConfig(), _store, train, "nope", ckpts[0])
    assert "features/nope/features.json is missing" in missing


def test_changed_samples_and_stale_ids_are_refused(tmp_path):
    """Unit level, no model: the index hash and the per-sample ids."""
    from safetensors.torch import save_file

    from himix_megatron.data.features import DESCRIPTION, FeatureStore, features_dir
    from himix_megatron.data.synthetic import SyntheticConfig, generate

    data = tmp_path / "data"
    generate(SyntheticConfig(num_samples=300, maxcount=300, image_size=16), str(data))
    from himix_megatron.data.features import index_sha256

    expected = {"format": "himix-vision-features", "version": 1, "dtype": None, "shape": [2, 3],
                "encoder": {"name": "x"}, "preprocessing": {"size": 16}}
    directory = features_dir(str(data), "f")
    os.makedirs(directory)
    found = dict(expected, dtype="float32", index_sha256=index_sha256(str(data)),
                 shards={"shard-000000.tar": {"file": "shard-000000.safetensors", "count": 300}})
    (tmp_path / "data" / "features" / "f" / DESCRIPTION).write_text(json.dumps(found))
    save_file({"features": torch.ones(300, 2, 3), "has_image": torch.ones(300, dtype=torch.uint8)},
              os.path.join(directory, "shard-000000.safetensors"),
              metadata={"ids": json.dumps([f"k{i}" for i in range(300)])})
    store = FeatureStore("f", [str(data)], expected)
    tar = os.path.join(str(data), "shard-000000.tar")
    assert store.read(tar, 2, "k2").shape == (2, 3)
    with pytest.raises(DataError, match="sample 3 was cached for id 'k3', the shard now holds 'other'"):
        store.read(tar, 3, "other")
    with open(data / "index.json", "a") as f:
        f.write(" ")  # the sample set changed after the features were cached
    with pytest.raises(DataError, match="computed for other samples"):
        FeatureStore("f", [str(data)], expected)


@pytest.mark.slow
def test_the_tool_resumes_shard_by_shard(cached):
    ckpts, train = cached
    from himix_megatron.data.features import features_dir

    directory = features_dir(train, "fp32")
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    assert len(files) == 4  # 400 samples in shards of 100
    before = {f: os.path.getmtime(os.path.join(directory, f)) for f in files}
    os.remove(os.path.join(directory, files[1]))
    run_world(1, ParallelConfig(), _cache, ["--load", ckpts[0], "--data-path", train, "--name", "fp32",
                                            "--dtype", "float32"])
    after = {f: os.path.getmtime(os.path.join(directory, f)) for f in files}
    assert [f for f in files if after[f] != before[f]] == [files[1]]


@pytest.mark.slow
def test_the_tool_at_tp2_writes_the_tp1_features(cached):
    """At TP=2 the encoder is replicated (each rank encodes half a batch; parallel/encoder.py) and TP rank 0
    writes: the same features as one process, for batches that split evenly and (7 per batch) unevenly."""
    from safetensors.torch import load_file

    from himix_megatron.data.features import features_dir

    ckpts, train = cached
    run_world(2, ParallelConfig(2), _cache, ["--load", ckpts[0], "--data-path", train, "--name", "tp2",
                                             "--dtype", "float32", "--batch-size", "7",
                                             "--tensor-model-parallel-size", "2"])
    tp1, tp2 = features_dir(train, "fp32"), features_dir(train, "tp2")
    files = sorted(f for f in os.listdir(tp1) if f.endswith(".safetensors"))
    assert sorted(f for f in os.listdir(tp2) if f.endswith(".safetensors")) == files
    for f in files:
        want, got = load_file(os.path.join(tp1, f)), load_file(os.path.join(tp2, f))
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=f"{f} {key}")
