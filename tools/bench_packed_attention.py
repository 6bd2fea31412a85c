"""Packed-row attention on the local spec (CPU): one SDPA call per segment against one call with a mask.

    python tools/bench_packed_attention.py [--text 2048] [--segments 2 8 32] [--vision 728] [--threads 2]

A packed HiMix row has text segments t_1..t_S, each attending over its own image's vision keys and its own
causal prefix. `core_attention.packed_sdpa` makes one SDPA call per segment: the work is
sum_i M_i (N + M_i). The alternative is one SDPA call over the whole row's keys [v_1; t_1; ...; v_S; t_S]
with a block-diagonal, per-segment bottom-right mask: the work is T (S N + T), quadratic in the number of
images. Both give the same result (checked here); the forward+backward times are printed side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from himix_megatron.data.packing import segment_params
from himix_megatron.model.core_attention import packed_sdpa


def masked_sdpa(query, key, value, seg):
    """The whole row in one SDPA call: key j visible to query i iff same segment and bottom-right causal."""
    q_seg = torch.repeat_interleave(torch.arange(len(seg.seqlens_q)), torch.tensor(seg.seqlens_q))
    k_seg = torch.repeat_interleave(torch.arange(len(seg.seqlens_kv)), torch.tensor(seg.seqlens_kv))
    q_pos = seg.text_positions + torch.tensor([kv - q for q, kv in zip(seg.seqlens_q, seg.seqlens_kv)])[q_seg]
    k_pos = torch.cat([torch.arange(n) for n in seg.seqlens_kv])
    mask = (q_seg[:, None] == k_seg[None, :]) & (k_pos[None, :] <= q_pos[:, None])
    q, k, v = (t.transpose(0, 1)[None] for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1).reshape(query.shape[0], -1)


def timed(fn, inputs, repeats):
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        for t in inputs:
            t.grad = None
        start = time.perf_counter()
        fn(*inputs).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=int, default=2048, help="text tokens in the row")
    p.add_argument("--segments", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--vision", type=int, default=728, help="vision tokens per image (N)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"row of {args.text} text tokens, N = {args.vision} per image, {args.heads} heads / {args.groups} groups "
          f"x {args.head_dim}, fp32, {args.threads} threads; forward + backward, median of {args.repeats}")
    print(f"{'segments':>8} | {'per-segment SDPA':>16} | {'one masked SDPA':>15} | {'ratio':>6} | max |diff|")
    for count in args.segments:
        lengths = [args.text // count] * count
        lengths[-1] += args.text - sum(lengths)
        seg = segment_params(lengths, [True] * count, args.vision)
        kv = sum(seg.seqlens_kv)
        query = torch.randn(args.text, args.heads, args.head_dim, generator=g, requires_grad=True)
        key = torch.randn(kv, args.groups, args.head_dim, generator=g, requires_grad=True)
        value = torch.randn(kv, args.groups, args.head_dim, generator=g, requires_grad=True)
        with torch.no_grad():
            diff = (packed_sdpa(query, key, value, seg) - masked_sdpa(query, key, value, seg)).abs().max().item()
        loop = timed(lambda q, k, v: packed_sdpa(q, k, v, seg), (query, key, value), args.repeats)
        masked = timed(lambda q, k, v: masked_sdpa(q, k, v, seg), (query, key, value), args.repeats)
        print(f"{count:>8} | {loop * 1e3:>13.1f} ms | {masked * 1e3:>12.1f} ms | {masked / loop:>5.2f}x | {diff:.1e}")


if __name__ == "__main__":
    main()
