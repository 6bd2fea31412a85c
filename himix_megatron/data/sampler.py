"""The sample order: which sample sits at each position of the global stream, and who reads it.

Pure index arithmetic, no I/O, so every property (coverage, disjointness, resumption) is exact and
cheap to test.

Global stream: position g = 0, 1, 2, ... names one sample. Epochs follow each other without a gap.
- Concatenation (no weights): the datasets form one index space of N samples; epoch e = g // N uses a
  permutation seeded by (seed, e). Every sample appears exactly once per epoch.
- Weighted blend: a fixed interleaving pattern of `chunk` positions gives dataset d about
  weight_d * chunk of them (deterministic, error-minimising, so the mix is even at every scale);
  dataset d then reads its own stream, epoch by epoch, each epoch a permutation seeded by
  (seed, d, e). Every sample of d appears exactly once per epoch of d.

Data parallelism: rank r of W owns positions g = r + k * W, k = 0, 1, ... (its "rank stream").
The ranks partition every epoch between them. Loader workers split the rank stream in chunks
round-robin; see loader.py.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

from himix_megatron.data.records import DataError


class SampleOrder:
    def __init__(
        self,
        sizes: Sequence[int],
        weights: Optional[Sequence[float]] = None,
        *,
        seed: int = 0,
        shuffle: bool = True,
        chunk: int = 10000,
    ):
        self.sizes = [int(n) for n in sizes]
        if not self.sizes or any(n < 0 for n in self.sizes) or sum(self.sizes) == 0:
            raise DataError(f"dataset sizes {self.sizes}: need at least one sample")
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self._perms: OrderedDict = OrderedDict()
        self.weights: Optional[list[float]] = None
        if weights is not None:
            self._init_blend(weights, chunk)

    def _init_blend(self, weights: Sequence[float], chunk: int) -> None:
        if len(weights) != len(self.sizes):
            raise DataError(f"{len(weights)} blend weights for {len(self.sizes)} datasets")
        for d, (w, n) in enumerate(zip(weights, self.sizes)):
            if not w > 0:
                raise DataError(f"blend weight {w} of dataset {d} must be positive")
            if n == 0:
                raise DataError(f"dataset {d} of the blend has no samples")
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        w = np.asarray(self.weights)
        counts = np.zeros(len(w), dtype=np.int64)
        pattern = np.empty(chunk, dtype=np.int64)
        within = np.empty(chunk, dtype=np.int64)
        for r in range(chunk):
            d = int(np.argmax(w * (r + 1) - counts))  # the dataset furthest behind its share
            pattern[r], within[r] = d, counts[d]
            counts[d] += 1
        if (counts == 0).any():
            d = int(np.argmin(counts))
            raise DataError(f"blend weight {self.weights[d]:.2e} of dataset {d} is below 1/{chunk}: "
                            "raise it or the blend chunk")
        self.chunk, self.pattern, self.within, self.per_chunk = chunk, pattern, within, counts

    @property
    def epoch_length(self) -> int:
        """Samples in one pass: over everything (concatenation) or the nominal sum of sizes (blend)."""
        return int(self.offsets[-1])

    def fingerprint(self) -> dict:
        return {"sizes": self.sizes, "weights": self.weights, "seed": self.seed, "shuffle": self.shuffle,
                "chunk": getattr(self, "chunk", None)}

    def _perm(self, key: tuple, n: int) -> np.ndarray:
        perm = self._perms.get(key)
        if perm is None:
            perm = np.random.default_rng([self.seed, *key]).permutation(n)
            self._perms[key] = perm
            while len(self._perms) > 4:  # a worker only ever straddles one epoch boundary per dataset
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(key)
        return perm

    def __call__(self, g: int) -> tuple[int, int]:
        """Global position -> (dataset, sample index within that dataset)."""
        if g < 0:
            raise IndexError(g)
        if self.weights is None:
            n = self.epoch_length
            epoch, i = divmod(g, n)
            flat = int(self._perm((epoch,), n)[i]) if self.shuffle else i
            d = int(np.searchsorted(self.offsets, flat, side="right")) - 1
            return d, flat - int(self.offsets[d])
        c, r = divmod(g, self.chunk)
        d = int(self.pattern[r])
        j = c * int(self.per_chunk[d]) + int(self.within[r])
        epoch, i = divmod(j, self.sizes[d])
        return d, (int(self._perm((d, epoch), self.sizes[d])[i]) if self.shuffle else i)


def rank_position(rank: int, world: int, k: int) -> int:
    """Global position of the k-th sample of `rank`'s stream."""
    return rank + k * world


def rank_stream_length(rank: int, world: int, num_samples: Optional[int]) -> Optional[int]:
    """How many of the first `num_samples` global positions belong to `rank` (None: endless)."""
    if num_samples is None:
        return None
    return max(0, (num_samples - rank + world - 1) // world)
