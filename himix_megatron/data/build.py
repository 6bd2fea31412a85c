"""Build a shard directory from LLaVA JSON/JSONL and LLaVA-OneVision parquet inputs.

Shard k holds the valid records among input records [k * maxcount, (k + 1) * maxcount): its content
depends only on the inputs, so shards can be built in any order, by any number of workers, and a
re-run rebuilds only the shards whose tar + sidecar pair is missing or stale. Skipped records are
listed in the shard sidecars and gathered into `index.json`, which is written last: a directory with
an `index.json` is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

from himix_megatron.data import shards as S
from himix_megatron.data.records import DataError, SampleError
from himix_megatron.data.sources import JsonSource, Source, open_sources, prepare

log = logging.getLogger(__name__)

BUILDER_VERSION = 1


@dataclass(frozen=True)
class BuildConfig:
    output: str
    json: tuple[str, ...] = ()
    parquet: tuple[str, ...] = ()
    image_folder: Optional[str] = None
    maxcount: int = 10000
    workers: int = 1
    progress: bool = True

    def __post_init__(self):
        if self.maxcount < 1:
            raise DataError(f"--maxcount={self.maxcount} must be >= 1")
        if self.workers < 1:
            raise DataError(f"--workers={self.workers} must be >= 1")
        if self.image_folder is not None and not os.path.isdir(self.image_folder):
            raise DataError(f"--image-folder {self.image_folder}: not a directory")


@dataclass
class _Plan:
    sources: list[Source]
    starts: list[int]  # first global record number of each source
    total: int
    maxcount: int
    image_folder: Optional[str]
    fingerprint: str
    output: str
    done: dict[int, dict] = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return (self.total + self.maxcount - 1) // self.maxcount

    def records(self, start: int, stop: int):
        """Global record range -> RawRecords with their global numbers, across source boundaries."""
        for src, first in zip(self.sources, self.starts):
            lo, hi = max(start, first), min(stop, first + len(src))
            if lo < hi:
                for j, rec in enumerate(src.read(lo - first, hi - first)):
                    yield lo + j, rec


def build_shards(cfg: BuildConfig, sources: Optional[Sequence[Source]] = None) -> dict:
    """Build (or finish building) `cfg.output`; returns the index. `sources` overrides cfg.json/parquet
    (used by the synthetic generator)."""
    if sources is None and not cfg.json and not cfg.parquet:
        raise DataError("no inputs: give at least one --json or --parquet")
    srcs = list(sources) if sources is not None else open_sources(cfg.json, cfg.parquet)
    _check_image_folder(srcs, cfg.image_folder)
    starts, total = [], 0
    for s in srcs:
        starts.append(total)
        total += len(s)
    if total == 0:
        raise DataError("the inputs hold no records")
    plan = _Plan(srcs, starts, total, cfg.maxcount, cfg.image_folder, _fingerprint(cfg, srcs), cfg.output)
    os.makedirs(cfg.output, exist_ok=True)
    _check_existing(plan)
    todo = [k for k in range(plan.num_shards) if k not in plan.done]
    if len(todo) < plan.num_shards:
        log.info("%s: %d of %d shards already built, resuming", cfg.output, plan.num_shards - len(todo), plan.num_shards)

    from tqdm import tqdm

    done_records = sum(_shard_records(plan, k) for k in plan.done)
    bar = tqdm(total=total, initial=done_records, unit="rec", desc=f"shards -> {cfg.output}", disable=not cfg.progress)
    try:
        if cfg.workers == 1 or len(todo) <= 1:
            for k in todo:
                plan.done[k] = _build_one(plan, k)
                bar.update(_shard_records(plan, k))
        else:
            global _PLAN
            _PLAN = plan  # inherited by forked workers: JSON inputs are not pickled per task
            ctx = mp.get_context("fork")
            with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
                for k, meta in zip(todo, pool.map(_build_in_worker, todo)):
                    plan.done[k] = meta
                    bar.update(_shard_records(plan, k))
            _PLAN = None
    finally:
        bar.close()
    index = _index(plan)
    S.write_index(cfg.output, index)
    reasons = ", ".join(f"{r}: {n}" for r, n in index["skipped_by_reason"].items()) or "none"
    log.info("%s: %d samples in %d shards; skipped %d (%s)", cfg.output, index["num_samples"],
             len(index["shards"]), index["num_skipped"], reasons)
    return index


_PLAN: Optional[_Plan] = None


def _build_in_worker(k: int) -> dict:
    return _build_one(_PLAN, k)


def _shard_records(plan: _Plan, k: int) -> int:
    return min(plan.total, (k + 1) * plan.maxcount) - k * plan.maxcount


def _build_one(plan: _Plan, k: int) -> dict:
    name = S.shard_name(k)
    start, stop = k * plan.maxcount, min(plan.total, (k + 1) * plan.maxcount)
    skipped = []
    width = max(8, len(str(plan.total)))

    def samples():
        for number, rec in plan.records(start, stop):
            try:
                yield prepare(rec, f"{number:0{width}d}", plan.image_folder)
            except SampleError as e:
                rec_id = rec.obj.get("id") if isinstance(rec.obj, dict) else None
                skipped.append({"source": rec.source, "index": rec.index, "id": None if rec_id is None else str(rec_id),
                                "reason": e.reason, "detail": e.detail})

    meta = S.write_shard(os.path.join(plan.output, name), samples())
    meta.update(records=[start, stop], skipped=skipped, fingerprint=plan.fingerprint)
    S.write_meta(plan.output, name, meta)
    return meta


def _check_image_folder(sources: Sequence[Source], folder: Optional[str]) -> None:
    if folder is not None:
        return
    for src in sources:
        if isinstance(src, JsonSource):
            for rec in src.read(0, len(src)):
                if rec.image_path:
                    raise DataError(f"{src.path} refers to image files (e.g. {rec.image_path!r}); "
                                    "give --image-folder")


def _fingerprint(cfg: BuildConfig, sources: Sequence[Source]) -> str:
    spec = {
        "builder": BUILDER_VERSION,
        "sources": [s.fingerprint() for s in sources],
        "maxcount": cfg.maxcount,
        "image_folder": os.path.abspath(cfg.image_folder) if cfg.image_folder else None,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _check_existing(plan: _Plan) -> None:
    """Collect finished shards; refuse to mix with a directory built from other inputs."""
    index_path = os.path.join(plan.output, S.INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                old = json.load(f).get("fingerprint")
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None and old != plan.fingerprint:
            raise DataError(f"{plan.output} was built from other inputs or options (fingerprint {old} != "
                            f"{plan.fingerprint}); choose a new --output or delete it")
    for name in os.listdir(plan.output):
        if ".tmp." in name:  # left by a crashed run
            os.remove(os.path.join(plan.output, name))
    for k in range(plan.num_shards):
        name = S.shard_name(k)
        try:
            with open(os.path.join(plan.output, S.meta_name(name)), encoding="utf-8") as f:
                meta = json.load(f)
            size = os.path.getsize(os.path.join(plan.output, name))
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("fingerprint") == plan.fingerprint and meta.get("bytes") == size:
            plan.done[k] = meta
        elif meta.get("fingerprint") != plan.fingerprint:
            raise DataError(f"{plan.output}/{name} was built from other inputs or options; "
                            "choose a new --output or delete it")


def _index(plan: _Plan) -> dict:
    metas = [plan.done[k] for k in range(plan.num_shards)]
    skipped = [s for m in metas for s in m["skipped"]]
    return {
        "format": S.FORMAT,
        "version": S.VERSION,
        "fingerprint": plan.fingerprint,
        "inputs": [s.name for s in plan.sources],
        "maxcount": plan.maxcount,
        "num_records": plan.total,
        "num_samples": sum(m["count"] for m in metas),
        "num_skipped": len(skipped),
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped).most_common()),
        "shards": [{"name": m["name"], "count": m["count"], "bytes": m["bytes"]} for m in metas],
        "skipped": skipped,
    }
