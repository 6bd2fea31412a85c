#!/usr/bin/env python
"""HiMix against the paper's baselines on one stack, side by side in one run (issue 14).

    python tools/bench_baselines.py [--hidden 1024 --layers 8] [--ratio 728:64] [--new-tokens 32] [--repeats 3]

The model is tools/bench.py's: Llama-3.2-1B-shaped but smaller (hidden 1024, 8 layers, GQA 16/8 heads, FFN
2816, vocab 32000), reading SigLIP-sized features (728 x 1152). The vision encoder never runs: every model reads
the same precomputed features, as in training with a frozen encoder (HiMix takes `vision_features=`; the LLaVA
models get a stand-in vision tower that returns them).

1. Training step (megatron, tools/bench.py's `step`: megatron DDP + Adam, fp32, 4 micro-batches of 1 sample):
   vanilla, vanilla + gamma-MoD (model/gamma_mod.py: every layer but the first three and the last, capacity
   0.5 of the image tokens, whole-layer skips), HiMix.
2. Inference, prefill + `--new-tokens` greedy tokens through transformers' `generate` with the KV cache
   (random weights; the same decoder weights in every LLaVA variant): vanilla (LlavaForConditionalGeneration),
   FastV K=2 at R=50% and 75% and gamma-MoD (hf/modeling_llava_baselines.py), and HiMix (hf/modeling_himix.py).
   The gamma-MoD router is set to skip every image token in the MoD layers (its upper bound: a trained router
   skips some); in the HF model a skipped token skips the MLP only (its "mlp" mode, the one that saves compute
   there).

Each figure is the median over `--repeats` rounds, each round running every model once in a rotating order.
Printed per model: time, speedup over vanilla, and the FLOP ratio vanilla / model by the paper's rule
(himix_megatron.flops: training = 3 x forward; inference = prefill forward only, the part the paper's
Tables 5 and 9 count).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Features(torch.nn.Module):
    """Stands in for LLaVA's vision tower: returns precomputed SigLIP hidden states [b, 1 + N, d_v]."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden
        self.dtype = hidden.dtype

    def forward(self, pixel_values, output_hidden_states=True, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(last_hidden_state=self.hidden, hidden_states=(self.hidden,) * 3)


def _median_rounds(runs: dict, repeats: int) -> dict:
    times = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def training(args, lm, vision, n, m):
    import bench
    from himix_megatron.flops import gamma_mod_training_flops, training_flops
    from himix_megatron.model.gamma_mod import config_overrides

    data = {arch: bench.batch(lm, vision, n, m, 1, "fp32", arch=arch) for arch in ("himix", "vanilla")}
    built = {"vanilla": bench.build("vanilla", lm, vision, "fp32"),
             "vanilla + gamma-MoD": bench.build("vanilla", lm, vision, "fp32", **config_overrides({})),
             "HiMix": bench.build("himix", lm, vision, "fp32")}
    runs = {name: (lambda b=b, d=data["himix" if name == "HiMix" else "vanilla"]: bench.step(*b, d, args.micro_batches))
            for name, b in built.items()}
    for run in runs.values():
        run()  # warm-up, allocates Adam's state
    times = _median_rounds(runs, args.repeats)
    flops = {"vanilla": training_flops(lm, "vanilla", n, m, "finetune", vision.hidden_size),
             "vanilla + gamma-MoD": gamma_mod_training_flops(lm, n, m, "finetune"),
             "HiMix": training_flops(lm, "himix", n, m, "finetune", vision.hidden_size)}
    return times, flops


def _llava(lm, vision, n, baselines=None, state=None):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from himix_megatron.hf.modeling_llava_baselines import LlavaBaselinesConfig, LlavaBaselinesForConditionalGeneration

    text = LlamaConfig(vocab_size=lm.vocab_size + 1, hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size,
                       num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_attention_heads,
                       num_key_value_heads=lm.num_query_groups, max_position_embeddings=4096)
    tower = SiglipVisionConfig(hidden_size=vision.hidden_size, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=16, image_size=14 * 27, patch_size=14)
    fields = dict(text_config=text, vision_config=tower, image_token_id=lm.vocab_size, image_seq_length=n,
                  vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = (LlavaBaselinesForConditionalGeneration(LlavaBaselinesConfig(**fields, **baselines)) if baselines else
             LlavaForConditionalGeneration(LlavaConfig(**fields)))
    if state is not None:
        missing, _ = model.load_state_dict(state, strict=False)
        assert all("mod_router" in k for k in missing), missing  # the same decoder weights as vanilla
    return model.eval()


def inference(args, lm, vision, n, m):
    from himix_megatron.flops import decoder_cost, fastv_cost, gamma_mod_cost
    from himix_megatron.hf.configuration_himix import HiMixConfig
    from himix_megatron.hf.modeling_himix import HiMixForCausalLM
    from himix_megatron.config import default_mod_layers

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, n + 1, vision.hidden_size, generator=g)  # SigLIP's penultimate states, 1 + N patches
    text = torch.randint(0, lm.vocab_size, (1, m), generator=g)
    pixels = torch.zeros(1, 3, 14 * 27, 14 * 27)
    mod_layers = list(default_mod_layers(lm.num_layers))
    vanilla = _llava(lm, vision, n)
    state = vanilla.state_dict()
    models = {"vanilla": vanilla,
              "FastV K=2 R=50%": _llava(lm, vision, n, dict(fastv_k=2, fastv_r=0.5), state),
              "FastV K=2 R=75%": _llava(lm, vision, n, dict(fastv_k=2, fastv_r=0.75), state),
              "vanilla + gamma-MoD": _llava(lm, vision, n, dict(mod_layers=mod_layers, mod_skip="mlp",
                                                                 mod_router_bias=True, mod_route_prefix=False), state)}
    with torch.no_grad():
        router = models["vanilla + gamma-MoD"].model.language_model.mod_router
        router.weight.zero_()
        router.bias.copy_(torch.tensor([10.0, -10.0]))  # p(route) = 2e-9 < threshold: every image token skips
    for model in models.values():
        model.model.vision_tower = _Features(hidden)
    image = torch.full((1, n), lm.vocab_size)
    ids = torch.cat([image, text], 1)
    config = HiMixConfig(vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size,
                         num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_attention_heads,
                         num_key_value_heads=lm.num_query_groups, max_position_embeddings=4096,
                         vision_config=dict(hidden_size=vision.hidden_size, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=16, image_size=56, patch_size=14), eos_token_id=None)
    torch.manual_seed(0)
    himix = HiMixForCausalLM(config).eval()
    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, num_beams=1)
    runs = {name: (lambda model=model: model.generate(input_ids=ids, pixel_values=pixels, **generate))
            for name, model in models.items()}
    runs["HiMix"] = lambda: himix.generate(input_ids=text, vision_features=hidden[:, 1:], **generate)
    with torch.no_grad():
        for run in runs.values():
            run()  # warm-up
        times = _median_rounds(runs, args.repeats)
    flops = {"vanilla": decoder_cost(lm, "vanilla", n, m, vision.hidden_size).flops,
             "FastV K=2 R=50%": fastv_cost(lm, n, m, 2, 0.5).flops, "FastV K=2 R=75%": fastv_cost(lm, n, m, 2, 0.75).flops,
             "vanilla + gamma-MoD": gamma_mod_cost(lm, n, m, mod_layers, capacity=1e-9, skip="mlp").flops,
             "HiMix": decoder_cost(lm, "himix", n, m, vision.hidden_size).flops}
    return times, flops


def _table(title, times, flops):
    base_t, base_f = times["vanilla"], flops["vanilla"]
    print(f"\n{title}")
    print(f"  {'model':<22} {'time (s)':>9} {'speedup':>8} {'FLOP ratio':>11}")
    for name in times:
        print(f"  {name:<22} {times[name]:9.3f} {base_t / times[name]:7.2f}x {base_f / flops[name]:10.2f}x")


def main(argv=None) -> int:
    import bench

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ratio", default="728:64", help="N:M vision:text tokens")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-training", action="store_true")
    args = p.parse_args(argv)

    from himix_megatron import platform
    from himix_megatron.config import ParallelConfig

    platform.initialize(ParallelConfig())
    bench.keep_freed_memory()
    lm, vision = bench.models(bench.parse_args(["--hidden", str(args.hidden), "--layers", str(args.layers)]))
    n, m = map(int, args.ratio.split(":"))
    print(f"decoder: hidden {lm.hidden_size}, {lm.num_layers} layers, {lm.num_attention_heads}/{lm.num_query_groups} "
          f"heads, FFN {lm.ffn_hidden_size}, vocab {lm.vocab_size}; V:L = {n}:{m}; {torch.get_num_threads()} threads")
    try:
        if not args.skip_training:
            _table(f"training step ({args.micro_batches} micro-batches of 1 sample, fp32, Adam)",
                   *training(args, lm, vision, n, m))
        _table(f"inference: prefill + {args.new_tokens} generated tokens (FLOP ratio: prefill)",
               *inference(args, lm, vision, n, m))
    finally:
        platform.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
