"""TP=2 must reproduce TP=1 with the same full weights: per-token loss and every gradient, both archs."""

import pytest
import torch

from himix_megatron.config import ParallelConfig
from model_utils import build_tiny, gather_tp, load_shards, tiny_batch, vanilla_slot
from multiprocess import run_world


def _batch(arch, image_present):
    """Vanilla: the image id at 2 (at 4 in the first sample), none in a sample without an image."""
    from himix_megatron.data.templates import IMAGE_TOKEN_INDEX

    tokens, positions, vision, labels = tiny_batch(image_slot=vanilla_slot(arch))
    if arch == "vanilla":
        tokens[0, 2], tokens[0, 4] = tokens[1, 3], IMAGE_TOKEN_INDEX
        if image_present is not None:
            tokens[1, 2] = tokens[1, 3]
    return tokens, positions, vision, labels.clamp(min=0)


def _reference_run(arch, image_present):
    model = build_tiny(arch)
    tokens, positions, vision, labels = _batch(arch, image_present)
    loss = model(tokens, positions, vision, labels=labels, image_present=image_present)
    loss.sum().backward()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return weights, loss.detach(), grads


def _tp_run(arch, parallel, weights, image_present):
    model = build_tiny(arch, parallel, seed=123)  # different init: every weight must come from `weights`
    load_shards(model, weights)
    tokens, positions, vision, labels = _batch(arch, image_present)
    loss = model(tokens, positions, vision, labels=labels, image_present=image_present)
    loss.sum().backward()
    grads = {}
    for name, param in model.named_parameters():
        grads[name] = gather_tp(name, param.grad, param)
    return loss.detach(), grads


@pytest.mark.slow
@pytest.mark.parametrize("mixed_images", [False, True], ids=["tp2", "tp2-some-samples-without-image"])
@pytest.mark.parametrize("arch", ["himix", "vanilla", "uniform", "hierarchical"])
def test_tp2_matches_tp1(arch, mixed_images):
    image_present = torch.tensor([True, False]) if mixed_images else None
    [(weights, ref_loss, ref_grads)] = run_world(1, ParallelConfig(), _reference_run, arch, image_present)
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    results = run_world(2, parallel, _tp_run, arch, parallel, weights, image_present)
    for loss, grads in results:
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
        assert grads.keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")
    # The vision branch really trained: its gradients are not trivially zero.
    vision_weight = {"himix": "decoder.layers.0.self_attention.linear_kv_vision.weight",
                     "vanilla": "vision_projection.encoder.linear_fc1.weight",
                     "uniform": "vision_projection.encoder.linear_fc1.weight",
                     "hierarchical": "decoder.layers.0.self_attention.vision_connector.linear_fc1.weight"}[arch]
    assert ref_grads[vision_weight].abs().sum() > 0
