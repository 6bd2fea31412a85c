"""Pipeline parallelism on megatron-core's schedules equals a single-rank run, and the encoder runs once
per micro-batch on the first stage only."""

import pytest
import torch

from himix_megatron.config import ParallelConfig
from model_utils import TINY_VISION, build_rank_chunks, gather_tp, global_names, tiny_batch, vanilla_slot
from multiprocess import run_world

MICROBATCHES = 4


def _microbatches(arch):
    from himix_megatron.parallel.pipeline import MicroBatch

    batches = []
    for k in range(MICROBATCHES):
        tokens, positions, vision, labels = tiny_batch(seed=100 + k, image_slot=vanilla_slot(arch, 1 + k))
        loss_mask = torch.ones_like(labels, dtype=torch.float)
        loss_mask[:, -2:] = 0  # as padding would: masked tokens must not count
        # Every other micro-batch has a sample without an image (for vanilla: without an image id).
        present = torch.tensor([True, k % 2 == 0])
        if arch == "vanilla" and k % 2:
            tokens[1, 1 + k] = 5
        batches.append(MicroBatch(tokens, positions, labels, loss_mask, images=vision, image_present=present))
    return batches


def _run(arch, parallel, weights=None):
    """Build this rank's chunks (loading `weights`, TP=1 names, if given), run one step; report."""
    from megatron.core import parallel_state

    from himix_megatron.parallel.pipeline import forward_backward

    chunks = build_rank_chunks(arch, parallel, weights)

    calls = []

    def encode(images):
        calls.append(images.shape)
        return images

    sums = forward_backward(chunks, _microbatches(arch), encode, vision_tokens=TINY_VISION.num_features)
    grads = {}
    for chunk in chunks:
        for name, (full_name, param) in global_names(chunk).items():
            grads[full_name] = gather_tp(full_name, param.grad, param)
    all_weights = {n: p.detach().clone() for c in chunks for n, (_, p) in [(k, v) for k, v in global_names(c).items()]}
    return {
        "losses": sums[:, 0] / sums[:, 1] if sums is not None else None,
        "grads": grads,
        "weights": all_weights if weights is None else None,
        "encoder_calls": len(calls),
        "first_stage": parallel_state.is_pipeline_first_stage(ignore_virtual=True),
    }


LAYOUTS = {
    "pp2": ParallelConfig(pipeline_model_parallel_size=2),
    "tp2xpp2": ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
    "pp2-interleaved": ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", ["himix", "vanilla", "hierarchical"])
def test_pipeline_matches_single_rank(arch, layout):
    if arch != "himix" and layout != "pp2":
        pytest.skip("the other layouts are covered by himix plus the TP tests; keeps the suite short")
    parallel = LAYOUTS[layout]
    [reference] = run_world(1, ParallelConfig(), _run, arch, ParallelConfig())
    world = parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
    results = run_world(world, parallel, _run, arch, parallel, reference["weights"])
    seen = set()
    for result in results:
        if result["losses"] is not None:  # last stage
            torch.testing.assert_close(result["losses"], reference["losses"], atol=1e-5, rtol=0)
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, reference["grads"][name], atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")
            seen.add(name)
        # The frozen encoder runs once per micro-batch per pipeline, on its first stage only.
        assert result["encoder_calls"] == (MICROBATCHES if result["first_stage"] else 0)
    assert seen == set(reference["grads"]), "some parameters live on no stage"
    assert sum(r["losses"] is not None for r in results) == parallel.tensor_model_parallel_size
