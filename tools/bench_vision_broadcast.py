"""Cost of handing X_v to the later pipeline stages, against one stage's compute.

    torchrun --standalone --nproc-per-node 2 tools/bench_vision_broadcast.py [--model tiny] [--text-tokens 64]

PP=2 on gloo: per step, the first stage broadcasts [micro-batches, N, b, d_v] to the second, then
megatron-core's 1F1B schedule runs. Prints, per micro-batch, the broadcast time and the step time of
the whole pipeline, both medians over repetitions, and their ratio.
"""

import argparse
import statistics
import time

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="language model preset")
    p.add_argument("--vision-model", default="siglip-so400m-384")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from himix_megatron import platform
    from himix_megatron.config import ParallelConfig, build_transformer_config, language_model_preset, vision_model_preset

    parallel = ParallelConfig(pipeline_model_parallel_size=2)
    launch = platform.initialize(parallel)
    from megatron.core import parallel_state

    from himix_megatron.model import model_class
    from himix_megatron.parallel.pipeline import MicroBatch, build_model_chunks, forward_backward, share_vision_features

    lm, vision = language_model_preset(args.model), vision_model_preset(args.vision_model)
    config = build_transformer_config(lm, vision, parallel)
    chunks = build_model_chunks(model_class("himix"), config, lm)
    m, n = args.text_tokens, vision.num_features
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, lm.vocab_size, (1, m), generator=g)
    batches = [MicroBatch(tokens, torch.arange(m)[None], tokens, torch.ones(1, m), images=torch.randn(n, 1, vision.hidden_size))
               for _ in range(args.micro_batches)]
    first = parallel_state.is_pipeline_first_stage()
    columns = [1] * args.micro_batches
    features = [b.images if first else None for b in batches]

    broadcast, steps = [], []
    for _ in range(args.repeats + 1):  # the first round warms up
        torch.distributed.barrier()
        t0 = time.perf_counter()
        share_vision_features(features, columns, n, vision.hidden_size, torch.float32)
        broadcast.append(time.perf_counter() - t0)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        forward_backward(chunks, batches, lambda images: images, vision_tokens=n)
        torch.distributed.barrier()
        steps.append(time.perf_counter() - t0)
    per_mb = lambda xs: 1e3 * statistics.median(xs[1:]) / args.micro_batches  # noqa: E731
    if launch.rank == 0:
        size = n * vision.hidden_size * 4 / 2**20
        print(f"decoder {args.model}, X_v {n} x {vision.hidden_size} fp32 ({size:.2f} MiB per sample), "
              f"M = {m}, {args.micro_batches} micro-batches, PP=2 on gloo")
        print(f"X_v broadcast per micro-batch:          {per_mb(broadcast):8.2f} ms")
        print(f"pipeline step (fwd+bwd) per micro-batch: {per_mb(steps):8.2f} ms")
        print(f"broadcast / step: {statistics.median(broadcast[1:]) / statistics.median(steps[1:]):.2%}")
    platform.shutdown()


if __name__ == "__main__":
    main()
