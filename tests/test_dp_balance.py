"""Data-parallel load balance in the trainer (gloo ranks): balancing moves samples between ranks, never changes
what a step computes. The loss is the mean over the global batch's label tokens (calculate_per_token_loss: the
schedule keeps each rank's sum and finalize_model_grads divides the DP-summed gradients by the DP-summed token
count), so a balanced run, a round-robin run and a single-rank run log the same loss and gradient norm at every
step, and a balanced and a round-robin run at the same layout end with the same weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from himix_megatron.config import ParallelConfig
from multiprocess import run_world
from test_training import _cfg, _losses

STEPS = 4


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """Synthetic samples with 1-6 question rounds (lengths ~10-70 tokens), every fourth one text-only."""
    import numpy as np

    from himix_megatron.data.build import BuildConfig, build_shards
    from himix_megatron.data.sources import MemorySource, RawRecord
    from himix_megatron.data.synthetic import SyntheticConfig, make_records, write_word_tokenizer

    root = tmp_path_factory.mktemp("varied")
    base, _ = make_records(SyntheticConfig(num_samples=160, seed=3))
    rng = np.random.default_rng(0)
    records = []
    for i, raw in enumerate(base):
        turns = list(raw.obj["conversations"])
        for _ in range(int(min(5, rng.pareto(1.0)))):
            other = base[int(rng.integers(len(base)))].obj["conversations"]
            turns += [{"from": "human", "value": other[0]["value"].replace("<image>\n", "")}, other[1]]
        image = raw.image_bytes
        if i % 4 == 3:
            turns[0] = {"from": "human", "value": turns[0]["value"].replace("<image>\n", "")}
            image = None
        obj = {**raw.obj, "conversations": turns}
        records.append(RawRecord("varied", i, obj, image_bytes=image))
    build_shards(BuildConfig(output=str(root / "train"), maxcount=50, progress=False),
                 sources=[MemorySource("varied", records)])
    write_word_tokenizer(str(root / "tok"))
    return root


def _train_with_weights(cfg):
    """train(cfg), plus this rank's parameters at the end and the data-parallel plans of its steps."""
    from himix_megatron.training import data as training_data
    from himix_megatron.training import trainer

    captured = {"plans": []}
    setup, stream, step = trainer.setup, training_data.step_stream, trainer.train_step

    def capture_setup(c):
        captured["run"] = setup(c)
        return captured["run"]

    def capture_stream(run, loader, **kw):
        for step in stream(run, loader, **kw):
            captured["plans"].append(loader.last_plan)
            yield step

    def capture_step(run, *args, **kw):
        out = step(run, *args, **kw)
        if "gradients" not in captured:  # step 1's gradient, reduced over DP (and clipped, like the reference)
            captured["gradients"] = {n: p.main_grad.detach().clone() for n, p in run.chunks[0].named_parameters()
                                     if p.requires_grad}
        return out

    trainer.setup, training_data.step_stream, trainer.train_step = capture_setup, capture_stream, capture_step
    try:
        result = trainer.train(cfg)
    finally:
        trainer.setup, training_data.step_stream, trainer.train_step = setup, stream, step
    result["weights"] = {n: p.detach().clone() for n, p in captured["run"].chunks[0].named_parameters()}
    result["plans"], result["gradients"] = captured["plans"], captured["gradients"]
    return result


def _run(cfg, dp: int):
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    return run_world(tp * pp * dp, ParallelConfig(tp, pp), _train_with_weights, cfg)


@pytest.mark.slow
def test_balanced_and_round_robin_runs_are_the_same_training(varied):
    # Adam divides each gradient element by its own RMS: where an element is ~0, float32 rounding (which differs
    # with the split) picks the sign of a full-size update. eps 1e-4 keeps those updates as small as their
    # gradients, so that the runs' weights stay comparable.
    base = _cfg(varied, seq_length=64, packing_seq_length=64, micro_batch_size=1, global_batch_size=16,
                train_iters=STEPS, lr=1e-2, adam_eps=1e-4, template="tinyllama")
    [single] = _run(base, 1)
    assert len(_losses(single)) == STEPS
    # Each pipeline stage seeds its own initialisation: PP=2 x DP=2 is compared with one PP=2 replica.
    single_pp = _run(dataclasses.replace(base, pipeline_model_parallel_size=2), 1)[0]
    gains = []
    for layout, dp in ((dict(), 2), (dict(), 4), (dict(tensor_model_parallel_size=2), 2),
                       (dict(pipeline_model_parallel_size=2), 2)):
        reference = single_pp if layout.get("pipeline_model_parallel_size") else single
        reference_losses = torch.tensor(_losses(reference), dtype=torch.float64)
        reference_norms = torch.tensor([h["grad_norm"] for h in reference["history"]], dtype=torch.float64)
        runs = {}
        for balance in (True, False):
            cfg = dataclasses.replace(base, **layout, no_data_parallel_balance=not balance)
            runs[balance] = _run(cfg, dp)
            what = f"{layout or 'TP=1'} DP={dp} {'balanced' if balance else 'round-robin'}"
            result = runs[balance][0]
            # The same loss and gradient norm as one model replica training on the whole global batch.
            torch.testing.assert_close(torch.tensor(_losses(result), dtype=torch.float64), reference_losses,
                                       atol=1e-5, rtol=0, msg=what)
            # Step 1 starts from the same weights: the same gradient; later steps inherit float32 rounding that
            # Adam's 1 / sqrt(v) amplifies.
            norms = torch.tensor([h["grad_norm"] for h in result["history"]], dtype=torch.float64)
            torch.testing.assert_close(norms[:1], reference_norms[:1], atol=0, rtol=1e-6, msg=what)
            torch.testing.assert_close(norms, reference_norms, atol=0, rtol=1e-4, msg=what)
            if not layout:  # every parameter's gradient of step 1, as one rank computes it for the global batch
                for r in runs[balance]:
                    for name, grad in r["gradients"].items():
                        torch.testing.assert_close(grad, reference["gradients"][name], atol=1e-7, rtol=1e-5,
                                                   msg=f"{what} {name}")
            # Every rank planned the same split.
            plans = [r["plans"] for r in runs[balance]]
            assert all([p["shares"] for p in ps] == [p["shares"] for p in plans[0]] for ps in plans)
        # Balancing moved samples between ranks (unequal counts included) and lowered the planned imbalance.
        balanced, dealt = runs[True][0]["plans"], runs[False][0]["plans"]
        assert [p["shares"] for p in balanced] != [p["shares"] for p in dealt]
        assert any(len(set(p["samples"])) > 1 for p in balanced)
        assert all(sorted(sum(p["shares"], [])) == sorted(sum(q["shares"], [])) for p, q in zip(balanced, dealt))
        gains.append(sum(p["imbalance"] for p in dealt) / sum(p["imbalance"] for p in balanced))
        for rank, (a, b) in enumerate(zip(runs[True], runs[False])):
            for name, grad in a["gradients"].items():
                torch.testing.assert_close(grad, b["gradients"][name], atol=1e-7, rtol=1e-5,
                                           msg=f"{layout} DP={dp} rank {rank} gradient {name}")
            for name, weight in a["weights"].items():
                torch.testing.assert_close(weight, b["weights"][name], atol=1e-5, rtol=1e-4,
                                           msg=f"{layout} DP={dp} rank {rank} {name}")
    assert all(g > 1 for g in gains), gains


def test_the_log_line_and_tensorboard_show_the_imbalance(tmp_path, capsys):
    from test_wandb import tensorboard_scalars

    from himix_megatron.training.metrics import MetricsLogger

    metrics = MetricsLogger(rank=0, total_iters=2, start_iter=0, world_size=1, peak_flops=None,
                            tensorboard_dir=str(tmp_path), progress=False, log_interval=2)
    for iteration, planned, measured in ((1, 1.3, 1.5), (2, 1.1, None)):
        metrics.data_parallel_balance(planned, measured)
        metrics.step(iteration, loss_sum=2.0, label_tokens=4, text_tokens=10, samples=2, grad_norm=1.0,
                     skipped=False, lr=1e-3, loader_stats={"skipped": 0, "dropped": 0})
    metrics.close()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith("| DP imbalance 1.200 | DP time spread 1.500"), line
    scalars = tensorboard_scalars(tmp_path)[2]
    assert scalars["train/dp_imbalance"] == pytest.approx(1.2) and scalars["train/dp_time_spread"] == 1.5


def test_forward_backward_time_stops_where_the_gradient_reduction_starts():
    import time
    from types import SimpleNamespace

    from himix_megatron.training.dp_timing import ForwardBackwardTimer

    calls = []
    config = SimpleNamespace(finalize_model_grads_func=lambda *a, **k: calls.append(a))
    original = config.finalize_model_grads_func
    with ForwardBackwardTimer(config) as timer:
        time.sleep(0.05)  # forward-backward
        config.finalize_model_grads_func("chunks")
        time.sleep(0.3)  # the reduction, waiting for the slowest rank: not this rank's work
    assert calls == [("chunks",)] and config.finalize_model_grads_func is original
    assert 0.05 <= timer.seconds < 0.3
