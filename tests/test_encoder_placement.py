"""The encoder's placement under tensor parallelism (parallel/encoder.py): replicated, sharded and in between
give transformers' SigLIP and CLIP features on every rank, checkpoints cross between placements, and training
does not notice."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from himix_megatron.checkpoint import ModelDescription
from himix_megatron.config import ConfigError, ParallelConfig, language_model_preset, validate, vision_model_preset
from multiprocess import run_world
from test_vision import _hf_features, _random_hf

TINY = vision_model_preset("tiny")
DESCRIPTION = ModelDescription("himix", language_model_preset("tiny"), TINY, "tinyllama")
IMAGE_COUNTS = (1, 3, 4, 5)  # fewer images than copies, uneven and even shares


def _features_by_placement(tp: int, towers: list) -> list[dict]:
    """Per (vision config, HF state, pixels): E -> (this rank's QKV shape, features of each pixel batch)."""
    from himix_megatron.model.vision import VisionEncoder, build_vision_config, load_hf_vision_state_dict
    from himix_megatron.parallel.encoder import encoder_placement

    out = []
    for vision, state, pixels in towers:
        by_e = {}
        for e in [d for d in range(1, tp + 1) if tp % d == 0]:
            parallel = ParallelConfig(tp, encoder_tensor_model_parallel_size=e)
            encoder = VisionEncoder(build_vision_config(vision, parallel), vision, placement=encoder_placement(e))
            load_hf_vision_state_dict(encoder, state)
            qkv = encoder.decoder.layers[0].self_attention.linear_qkv.weight
            by_e[e] = (tuple(qkv.shape), [encoder(p) for p in pixels])
        out.append(by_e)
    return out


@pytest.mark.slow
def test_every_placement_gives_transformers_features():
    """SigLIP and CLIP (class token) at TP=4, one group of 4 ranks: E = 1 (4 copies), 2 (2 copies of 2 shards:
    the gather runs between counterparts) and 4 (sharded)."""
    import test_clip_vision as clip

    towers, expected = [], []
    for vision, hf, features_of in ((TINY, _random_hf(TINY), _hf_features),
                                    (clip.TINY, clip._random_hf(clip.TINY), clip._hf_features)):
        pixels = [torch.randn(b, 3, vision.image_size, vision.image_size) for b in IMAGE_COUNTS]
        towers.append((vision, hf.state_dict(), pixels))
        expected.append([features_of(hf, p) for p in pixels])
    for rank, per_tower in enumerate(run_world(4, ParallelConfig(4), _features_by_placement, 4, towers)):
        for (vision, _, _), by_e, want_all in zip(towers, per_tower, expected):
            assert sorted(by_e) == [1, 2, 4]
            for e, (qkv_shape, features) in by_e.items():
                assert qkv_shape == (3 * vision.hidden_size // e, vision.hidden_size), (rank, e)  # 1/E of it
                for b, got, want in zip(IMAGE_COUNTS, features, want_all):
                    assert got.shape == want.shape, (vision.name, rank, e, b)
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=0,
                                               msg=f"{vision.name}, rank {rank}, E={e}, {b} images")


def _save_then_load(state: dict, save_dir: str, save_e: int, load_parallel: ParallelConfig, pixels):
    """Load the HF encoder at this world's TP with E=save_e and save it; then `_load_and_encode` at `load_parallel`
    in the same world."""
    from megatron.core import parallel_state

    from himix_megatron.checkpoint import build_model, save_checkpoint
    from himix_megatron.model.vision import load_hf_siglip_state_dict

    tp = parallel_state.get_tensor_model_parallel_world_size()
    chunks, encoder = build_model(DESCRIPTION, ParallelConfig(tp, encoder_tensor_model_parallel_size=save_e))
    load_hf_siglip_state_dict(encoder, state)
    save_checkpoint(save_dir, chunks, DESCRIPTION, iteration=1, encoder=encoder)
    return _load_and_encode(save_dir, load_parallel, pixels)


def _load_and_encode(save_dir: str, parallel: ParallelConfig, pixels):
    """The checkpoint's encoder at `parallel` (its weights zeroed first, so all of them come from the file)."""
    from himix_megatron.checkpoint import build_model, load_checkpoint

    chunks, encoder = build_model(DESCRIPTION, parallel)
    with torch.no_grad():
        for p in encoder.parameters():
            p.zero_()
    load_checkpoint(save_dir, chunks, encoder=encoder, load_rng=False)
    return encoder(pixels)


@pytest.mark.slow
@pytest.mark.parametrize("save_e, load_e", [(1, 2), (2, 1)], ids=["replicated-to-sharded", "sharded-to-replicated"])
def test_checkpoints_load_across_placements(tmp_path, save_e, load_e):
    """TP=2 x DP=2 (two TP groups, so the copies' replica numbering meets data parallelism): a checkpoint saved
    in one placement loads in the other, and at TP=1, with the encoder's exact weights."""
    hf = _random_hf(TINY)
    pixels = torch.randn(3, 3, TINY.image_size, TINY.image_size)
    expected = _hf_features(hf, pixels)
    save_dir = str(tmp_path / "ckpt")
    results = run_world(4, ParallelConfig(2), _save_then_load, hf.state_dict(), save_dir, save_e,
                        ParallelConfig(2, encoder_tensor_model_parallel_size=load_e), pixels)
    [tp1] = run_world(1, ParallelConfig(), _load_and_encode, save_dir, ParallelConfig(), pixels)
    for features in results + [tp1]:
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def _replicas_unmarked(state: dict, save_dir: str):
    """A replicated encoder whose copies all claim to be the main replica: what `mark_copies_as_replicas` fixes."""
    from megatron.core import dist_checkpointing

    from himix_megatron.checkpoint import build_model
    from himix_megatron.model.vision import VisionEncoder

    chunks, encoder = build_model(DESCRIPTION, ParallelConfig(2, encoder_tensor_model_parallel_size=1))
    unmarked = super(VisionEncoder, encoder).sharded_state_dict("vision_encoder.")  # megatron's own
    try:
        dist_checkpointing.save({"vision_encoder": unmarked}, save_dir)
    except Exception as e:  # rank 0 validates and raises; the others then lose their peer
        return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.slow
def test_without_renumbering_the_copies_dist_checkpointing_refuses_the_save(tmp_path):
    """The reason for `mark_copies_as_replicas`: both TP ranks' full copies claim replica 0."""
    errors = run_world(2, ParallelConfig(2), _replicas_unmarked, _random_hf(TINY).state_dict(), str(tmp_path))
    assert errors[0].startswith("CheckpointingException: Invalid access pattern for ShardedTensor"), errors
    assert "replica_id=(0, 0, 0)" in errors[0] and "tensor([[[[2]]]]" in errors[0]  # written twice


def test_the_encoder_tp_must_divide_the_tp():
    lm = language_model_preset("tiny")
    with pytest.raises(ConfigError, match="encoder_tensor_model_parallel_size=4 must be >= 1 and divide "
                                          "tensor_model_parallel_size=2"):
        validate(lm, ParallelConfig(2, encoder_tensor_model_parallel_size=4))
    with pytest.raises(ConfigError, match="encoder_tensor_model_parallel_size=0"):
        validate(lm, ParallelConfig(2, encoder_tensor_model_parallel_size=0))
    from himix_megatron.training.config import TrainConfig, check

    with pytest.raises(ConfigError, match="--encoder-tensor-model-parallel-size 4 must divide "
                                          "--tensor-model-parallel-size 2"):
        check(TrainConfig(train_iters=1, tensor_model_parallel_size=2, encoder_tensor_model_parallel_size=4), 2,
              te_available=False, cuda=False)
    assert ParallelConfig(4).encoder_tp == 1 and ParallelConfig(4, encoder_tensor_model_parallel_size=2).encoder_tp == 2


def test_the_trainer_replicates_the_encoder_when_the_images_split_evenly():
    from himix_megatron.training.config import TrainConfig, encoder_tensor_parallel_size

    def e(tp=4, **flags):
        return encoder_tensor_parallel_size(TrainConfig(tensor_model_parallel_size=tp, **flags))

    assert e(micro_batch_size=4) == 1 and e(micro_batch_size=8) == 1 and e(tp=2, micro_batch_size=2) == 1
    assert e(micro_batch_size=2) == 4  # two images for four ranks: sharding keeps all four busy
    assert e(micro_batch_size=5) == 4 and e(tp=2, micro_batch_size=3) == 2  # a rank would encode 2 of 5 / 3
    assert e(micro_batch_size=11) == 1 and e(tp=2, micro_batch_size=7) == 2  # shares 9% / 14% above even
    assert e(tp=1, micro_batch_size=1) == 1
    assert e(tp=2, micro_batch_size=1, packing_seq_length=2048) == 1  # a packed row holds many images
    assert e(tp=8, micro_batch_size=1, packing_seq_length=2048) == 8
    assert e(micro_batch_size=2, encoder_tensor_model_parallel_size=2) == 2  # the flag wins


def _train(cfg):
    from himix_megatron.training.trainer import train

    return [h["loss"] for h in train(cfg)["history"]]


@pytest.mark.slow
def test_training_is_the_same_in_every_placement(tmp_path):
    """TP=2 training with the encoder replicated or sharded: the same features, so the same losses (to float
    rounding: the sharded encoder sums its row-parallel partial products in another order)."""
    from data_utils import synthetic_training_data
    from himix_megatron.training.config import TrainConfig

    synthetic_training_data(tmp_path, 400, maxcount=100)
    base = TrainConfig(data_path=[str(tmp_path / "train")], tokenizer_model=str(tmp_path / "tok"), system_prompt="",
                       seq_length=24, micro_batch_size=4, lr=3e-3, train_iters=3, num_workers=0, progress=False,
                       log_interval=100, tensor_model_parallel_size=2)
    losses = {e: run_world(2, ParallelConfig(2), _train, dataclasses.replace(
        base, encoder_tensor_model_parallel_size=e))[0] for e in (1, 2)}
    assert len(losses[1]) == 3
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[2]), atol=1e-5, rtol=0)
