"""Data-parallel load balance: which rank trains which sample of a global batch.

A step ends when the heaviest data-parallel rank has produced its last gradient, so a step lasts as long
as the largest share of the global batch. Round-robin shares (rank r of W takes the batch's samples r,
r + W, ...) leave that to chance; with LLaVA-like lengths and 8 samples per rank the heaviest share is
~1.7x the mean. `assign` plans instead, from every sample's cost:

- The global batch of step s is the block of global positions [s * B, (s + 1) * B) of the sample order
  (sampler.py), whatever the assignment, so the run trains on exactly the samples it would without it.
- Greedy longest-processing-time: samples by decreasing cost (ties: stream order) each go to the rank with
  the least cost so far (ties: the lowest rank). Ranks may receive different numbers of samples; the loss
  is the mean over the global batch's label tokens (megatron-core's calculate_per_token_loss: the schedule
  keeps each rank's sum and finalize_model_grads divides the summed gradients by the token count
  all-reduced over data parallelism), so every split of the batch gives the same loss and gradient.
  Each rank gets at least one sample when B >= W (the first W samples go to distinct ranks).
- Should round-robin split a batch better than the greedy plan (rare), round-robin is kept.
- Pure and deterministic: every rank, every loader worker, computes the same plan from the same costs,
  with no communication.

Costs (`SampleCost`) are the stack's own training FLOPs (flops.py) of one sample: its text through the
decoder and the head, its attention over its segment's keys, and per image the vision K/V projections in
every layer (HiMix) or the N image positions in the sequence (vanilla), plus the frozen encoder's forward
when the run encodes images (none with cached features). A sample's text length is known without its
image: the loader reads only the json member of each sample of the step and tokenizes it (loader.py).

Only packed steps are planned. An unpacked step is a fixed number of micro-batches of micro_batch_size rows on
every rank (pipeline stages exchange activations of one shape per step, gamma-MoD weighs its aux loss per
micro-batch), and the unpacked loader keeps the rows full by replacing a bad sample with the rank's next one,
which a per-step plan over the global batch cannot do. Equal-count plans would still pay off (`assign(...,
equal_counts=True)`; tools/bench_dp_balance.py prints them), but packing, which the launch scripts use, has
neither constraint. Unpacked steps get the within-rank half: a step's samples are regrouped so that samples
of similar length share a micro-batch (loader.py, `length_groups`), which cuts dynamic padding.
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass
from typing import Optional, Sequence

STRATEGIES = ("balanced", "round-robin")


def round_robin(count: int, world: int) -> list[list[int]]:
    """Rank r's indices r, r + W, ... of a batch of `count` (the loader's order without balancing)."""
    return [list(range(r, count, world)) for r in range(world)]


def assign(costs: Sequence[float], world: int, equal_counts: bool = False) -> list[list[int]]:
    """Indices of `costs` per rank, each list in ascending (stream) order; see the module docstring.

    `equal_counts`: no rank takes more than ceil(len / world) samples (what a schedule of a fixed number of
    fixed-size micro-batches per rank needs); the greedy choice is then among the ranks not yet full."""
    if world < 1:
        raise ValueError(f"assign: world={world} must be >= 1")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    cap = -(-len(costs) // world) if equal_counts else len(costs)
    heap = [(0.0, r) for r in range(world)]  # (load, rank): ties go to the lowest rank
    shares: list[list[int]] = [[] for _ in range(world)]
    for i in order:
        load, r = heapq.heappop(heap)
        shares[r].append(i)
        if len(shares[r]) < cap:
            heapq.heappush(heap, (load + float(costs[i]), r))
    return [sorted(s) for s in shares]


def plan(costs: Sequence[float], world: int, strategy: str) -> list[list[int]]:
    if strategy == "balanced":
        # LPT is a heuristic (within 4/3 of the optimum); on a rare batch round-robin happens to split better,
        # and then it is kept, so balancing never lengthens a step.
        greedy, dealt = assign(costs, world), round_robin(len(costs), world)
        return dealt if max(loads(costs, dealt)) < max(loads(costs, greedy)) else greedy
    if strategy == "round-robin":
        return round_robin(len(costs), world)
    raise ValueError(f"data-parallel assignment {strategy!r} is not one of {list(STRATEGIES)}")


def loads(costs: Sequence[float], shares: Sequence[Sequence[int]]) -> list[float]:
    return [float(sum(costs[i] for i in share)) for share in shares]


def imbalance(rank_loads: Sequence[float]) -> float:
    """The heaviest rank's cost over the mean rank's: how much longer the step takes than a perfect split
    (1.0 = even; an empty batch counts as even)."""
    total = sum(rank_loads)
    return max(rank_loads) * len(rank_loads) / total if total > 0 else 1.0


@dataclass(frozen=True)
class SampleCost:
    """Training FLOPs of one sample from its text length and whether it has an image (flops.py).

    `encoder_flops`: the frozen encoder's forward per image, 0 when the run reads cached features.
    """

    language: object  # config.LanguageModelConfig
    arch: str
    vision_tokens: int
    vision_hidden_size: int
    stage: str
    encoder_flops: int = 0

    def __call__(self, text_length: int, has_image: bool) -> float:
        return _sample_flops(self, int(text_length), bool(has_image))

    def fingerprint(self) -> dict:
        """What the state records: resuming under a different cost model would plan other shares."""
        return {"model": getattr(self.language, "name", str(self.language)), "arch": self.arch,
                "vision_tokens": self.vision_tokens, "stage": self.stage, "encoder_flops": self.encoder_flops}


@functools.lru_cache(maxsize=1 << 16)
def _sample_flops(cost: SampleCost, text_length: int, has_image: bool) -> float:
    from himix_megatron.flops import training_flops

    if text_length < 1:
        return 0.0
    n = cost.vision_tokens if has_image else 0
    flops = training_flops(cost.language, cost.arch, n, text_length, cost.stage, cost.vision_hidden_size)
    return float(flops + (cost.encoder_flops if has_image else 0))


@dataclass(frozen=True)
class BalanceConfig:
    """How a packed loader splits each global batch of `global_batch_size` samples over the DP ranks.

    `cost(text_length, has_image)`: a sample's cost (`SampleCost`); None counts text tokens + images x 0,
    i.e. text alone. `strategy`: "balanced" or "round-robin" (--no-data-parallel-balance).
    """

    global_batch_size: int
    cost: Optional[SampleCost] = None
    strategy: str = "balanced"

    def __post_init__(self):
        if self.global_batch_size < 1:
            raise ValueError(f"BalanceConfig.global_batch_size={self.global_batch_size} must be >= 1")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"BalanceConfig.strategy={self.strategy!r} is not one of {list(STRATEGIES)}")

    def sample_cost(self, text_length: int, has_image: bool) -> float:
        if self.cost is None:
            return float(text_length)
        return self.cost(text_length, has_image)

    def fingerprint(self) -> dict:
        return {"global_batch_size": self.global_batch_size, "strategy": self.strategy,
                "cost": None if self.cost is None else self.cost.fingerprint()}
