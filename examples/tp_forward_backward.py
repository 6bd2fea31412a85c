"""A tiny HiMix decoder under tensor parallelism: forward, backward and a few optimizer steps.

    torchrun --standalone --nproc-per-node 2 examples/tp_forward_backward.py [--arch vanilla]

Each rank holds half of every attention head group, half of each vision K/V projection and half of
the MLP. The batch is fixed and the vision features random, so the point is the mechanics: the loss
printed by rank 0 falls as the model memorises the batch, and the vision-side weights (vision K/V, or connectors) get gradients.
"""

import argparse

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from himix_megatron.config import ARCHS

    parser.add_argument("--arch", choices=ARCHS, default="himix",
                        help="himix, the vanilla LLaVA baseline, or the paper's Fig. 4 variants")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--text-tokens", type=int, default=16)
    args = parser.parse_args()

    from himix_megatron import platform
    from himix_megatron.config import ParallelConfig, build_transformer_config, language_model_preset, vision_model_preset

    parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size)
    launch = platform.initialize(parallel, seed=1234)
    from himix_megatron.model import model_class

    lm, vision = language_model_preset("tiny"), vision_model_preset("tiny")
    model = model_class(args.arch)(build_transformer_config(lm, vision, parallel, arch=args.arch), lm)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    g = torch.Generator().manual_seed(0)  # identical data on every rank of the TP group
    tokens = torch.randint(0, lm.vocab_size, (4, args.text_tokens + 1), generator=g)
    features = torch.randn(vision.num_features, 4, vision.hidden_size, generator=g)
    positions = torch.arange(args.text_tokens).expand(4, -1)
    local_params = sum(p.numel() for p in model.parameters())
    if launch.rank == 0:
        print(f"tiny {args.arch}: TP={parallel.tensor_model_parallel_size}, {local_params} parameters on rank 0, "
              f"{vision.num_features} vision tokens x {vision.hidden_size}, {args.text_tokens} text tokens")
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        loss = model(tokens[:, :-1], positions, features, labels=tokens[:, 1:]).mean()
        loss.backward()
        optimizer.step()
        vision_grad = torch.stack([p.grad.norm() for n, p in model.named_parameters() if "vision" in n]).norm()
        if launch.rank == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}  |grad of vision-side parameters| {vision_grad.item():.4f}")
    platform.shutdown()


if __name__ == "__main__":
    main()
