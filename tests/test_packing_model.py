"""Packed rows equal their samples run one at a time: HiMix, its two variants and vanilla, per-token losses
and every parameter gradient; at TP=1 in process, and at TP=2, PP=2 and interleaved PP=2 x VPP=2."""

from __future__ import annotations

import pytest
import torch

from himix_megatron.config import ParallelConfig
from himix_megatron.data.packing import image_slot, segment_params
from himix_megatron.data.templates import IMAGE_TOKEN_INDEX
from model_utils import TINY_LM, TINY_VISION, build_rank_chunks, build_tiny, gather_tp, global_names
from multiprocess import run_world

ARCHS = ["himix", "uniform", "hierarchical", "vanilla"]
N, D_V = TINY_VISION.num_features, TINY_VISION.hidden_size


def make_samples(seed: int, lengths=(5, 11, 3, 8), images=(True, False, True, True), arch: str = "himix"):
    """Samples of different lengths, one without an image: (tokens [1, M], labels, loss_mask, X_v or None).
    Vanilla's text holds an image id per image, at a different place in each sample (its label untrained)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (m, has_image) in enumerate(zip(lengths, images)):
        ids = torch.randint(1, TINY_LM.vocab_size, (1, m + 1), generator=g)
        mask = (torch.rand(1, m, generator=g) > 0.3).float()
        mask[0, -1] = 1.0
        labels = ids[:, 1:].clone()
        if has_image and arch == "vanilla":
            slot = min(i, m - 1)
            ids[0, slot] = IMAGE_TOKEN_INDEX
            if slot:
                labels[0, slot - 1], mask[0, slot - 1] = 0, 0.0
        vision = torch.randn(N, 1, D_V, generator=g) if has_image else None
        out.append((ids[:, :-1], labels, mask, vision))
    return out


def pack_samples(samples, pad: int = 0):
    """One packed row of `samples`, padded by a trailing segment of `pad` tokens."""
    tokens = torch.cat([s[0] for s in samples] + [torch.zeros(1, pad, dtype=torch.long)], dim=1)
    labels = torch.cat([s[1] for s in samples] + [torch.zeros(1, pad, dtype=torch.long)], dim=1)
    mask = torch.cat([s[2] for s in samples] + [torch.zeros(1, pad)], dim=1)
    lengths = [s[0].shape[1] for s in samples] + ([pad] if pad else [])
    flags = [s[3] is not None for s in samples] + ([False] if pad else [])
    slots = [image_slot(s[0][0], s[3] is not None, "sample") for s in samples] + ([None] if pad else [])
    seg = segment_params(lengths, flags, N, image_slots=slots if any(k is not None for k in slots) else ())
    vision = [s[3] for s in samples if s[3] is not None]
    features = torch.cat(vision, dim=1) if vision else None
    return tokens, seg.text_positions[None], labels, mask, features, seg


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def one_at_a_time(model, samples):
    """Per-token losses of each sample on its own (no packing), and the gradient of their masked sum."""
    model.zero_grad()
    losses, total = [], 0.0
    for tokens, labels, mask, vision in samples:
        m = tokens.shape[1]
        loss = model(tokens, torch.arange(m)[None], vision, labels=labels)
        losses.append(loss.detach())
        total = total + (loss * mask).sum()
    total.backward()
    return torch.cat(losses, dim=1), _grads(model)


def packed(model, samples, pad: int = 0):
    model.zero_grad()
    tokens, positions, labels, mask, features, seg = pack_samples(samples, pad)
    loss = model(tokens, positions, features, labels=labels, packed_seq_params=seg)
    (loss * mask).sum().backward()
    real = sum(s[0].shape[1] for s in samples)
    return loss.detach()[:, :real], _grads(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_one_at_a_time(single_rank, arch):
    model = build_tiny(arch)
    samples = make_samples(0, arch=arch)
    want_loss, want_grads = one_at_a_time(model, samples)
    got_loss, got_grads = packed(model, samples, pad=5)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=0)
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")


@pytest.mark.parametrize("arch", ARCHS)
def test_no_leakage_across_segments(single_rank, arch):
    """Changing segment 0's image or text changes nothing in the other segments' outputs."""
    model = build_tiny(arch).eval()
    samples = make_samples(1, arch=arch)
    tokens, positions, labels, _, features, seg = pack_samples(samples)
    first = samples[0][0].shape[1]
    with torch.no_grad():
        other_image = features.clone()
        other_image[:, 0] += torch.randn_like(other_image[:, 0])
        changed_image = model(tokens, positions, other_image, packed_seq_params=seg)
        base = model(tokens, positions, features, packed_seq_params=seg)
        other_text = tokens.clone()
        other_text[0, :first] = (other_text[0, :first] + 7) % TINY_LM.vocab_size
        changed_text = model(other_text, positions, features, packed_seq_params=seg)
    assert not torch.allclose(changed_image[:, :first], base[:, :first])  # segment 0 does see its image
    for changed in (changed_image, changed_text):
        torch.testing.assert_close(changed[:, first:], base[:, first:], atol=1e-6, rtol=0)


def test_rope_positions_restart_in_every_segment(single_rank):
    """The same sample gives the same logits wherever it sits in the row; with positions running on
    across segments (as megatron's thd RoPE would count the vision keys, or a plain arange would) it does not."""
    model = build_tiny("himix").eval()
    a, b = make_samples(2, lengths=(6, 6), images=(True, True))
    with torch.no_grad():
        tokens, positions, _, _, features, seg = pack_samples([a, b])
        logits = model(tokens, positions, features, packed_seq_params=seg)
        alone = model(b[0], torch.arange(6)[None], b[3])
        torch.testing.assert_close(logits[:, 6:], alone, atol=1e-5, rtol=0)
        seg.text_positions = torch.arange(12)  # positions running on across segments
        wrong = model(tokens, positions, features, packed_seq_params=seg)
    assert (wrong[:, 6:] - alone).abs().max() > 1e-3


def test_packed_vision_features_shape_is_checked(single_rank):
    model = build_tiny("himix")
    tokens, positions, labels, _, features, seg = pack_samples(make_samples(3))
    with pytest.raises(ValueError, match=r"packed row must be \[N=.*images=3"):
        model(tokens, positions, features[:, :2], labels=labels, packed_seq_params=seg)


# --- the same through megatron-core's schedules, under model parallelism ------------------------------------


def _rows(arch, pipelined: bool):
    """Four packed micro-batches; under PP every row is padded to one decoder length, as training/data.py does."""
    from himix_megatron.parallel.pipeline import MicroBatch

    groups = [make_samples(10 + k, lengths=(4 + k, 7, 3 + 2 * k), images=(True, k % 2 == 0, True), arch=arch)
              for k in range(4)]
    decoder = lambda g: sum(s[0].shape[1] for s in g) + (N * sum(s[3] is not None for s in g) if arch == "vanilla" else 0)  # noqa: E731
    width = max(decoder(g) for g in groups)
    rows = []
    for g in groups:
        pad = width - decoder(g) if pipelined else 2
        tokens, positions, labels, mask, features, seg = pack_samples(g, pad)
        rows.append(MicroBatch(tokens, positions, labels, mask, images=features, segments=seg))
    return rows


def _run(arch, parallel, weights=None, pad_for_pipeline=False):
    from himix_megatron.parallel.pipeline import forward_backward

    chunks = build_rank_chunks(arch, parallel, weights)
    sums = forward_backward(chunks, _rows(arch, pad_for_pipeline), lambda x: x, vision_tokens=N)
    grads = {}
    for chunk in chunks:
        for name, (full_name, param) in global_names(chunk).items():
            grads[full_name] = gather_tp(full_name, param.grad, param)
    return {
        "sums": sums,
        "grads": grads,
        "weights": {full: p.detach().clone() for c in chunks for _, (full, p) in global_names(c).items()},
    }


LAYOUTS = {
    "tp2": ParallelConfig(tensor_model_parallel_size=2),
    "pp2": ParallelConfig(pipeline_model_parallel_size=2),
    "pp2-vpp2": ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_model_parallel_matches_single_rank(arch, layout):
    if arch == "uniform" and layout.startswith("pp"):
        pytest.skip("uniform shares one connector across all layers: no pipeline parallelism")
    if layout == "pp2-vpp2" and arch != "himix":
        pytest.skip("interleaving is covered by himix; keeps the suite short")
    parallel = LAYOUTS[layout]
    pipelined = parallel.pipeline_model_parallel_size > 1
    # The single-rank reference (itself equal to one sample at a time, tests above) pads its rows the same way.
    [reference] = run_world(1, ParallelConfig(), _run, arch, ParallelConfig(), None, pipelined)
    world = parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
    results = run_world(world, parallel, _run, arch, parallel, reference["weights"], pipelined)
    for result in results:
        if result["sums"] is not None:
            torch.testing.assert_close(result["sums"], reference["sums"], atol=1e-4, rtol=1e-5)
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, reference["grads"][name], atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")
    assert sum(r["sums"] is not None for r in results) == parallel.tensor_model_parallel_size
