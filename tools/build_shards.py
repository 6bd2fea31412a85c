#!/usr/bin/env python
"""Turn LLaVA-format JSON/JSONL (+ image folder) and LLaVA-OneVision parquet files into webdataset shards.

    python tools/build_shards.py --json llava_v1_5_mix665k.json --image-folder data/ \
        --output shards/mix665k --workers 32

Writes DIR/shard-%06d.tar (+ .meta.json sidecars) and DIR/index.json (shard counts and every skipped
sample with its reason). Re-running with the same inputs finishes an interrupted build; finished
shards are kept. Bad samples (missing or undecodable image, malformed conversation, empty turn,
several images) are skipped and listed, never fatal. See himix_megatron/data/build.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from himix_megatron.data.build import BuildConfig, build_shards
from himix_megatron.data.records import DataError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="append", default=[], metavar="FILE",
                   help="LLaVA JSON list or JSONL file (repeatable, globs allowed)")
    p.add_argument("--parquet", action="append", default=[], metavar="FILE",
                   help="LLaVA-OneVision parquet file (repeatable, globs allowed)")
    p.add_argument("--image-folder", help="root that JSON 'image' paths are relative to")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--maxcount", type=int, default=10000, help="input records per shard (default 10000)")
    p.add_argument("--workers", type=int, default=1, help="parallel shard writers")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        index = build_shards(BuildConfig(
            output=args.output, json=tuple(args.json), parquet=tuple(args.parquet), image_folder=args.image_folder,
            maxcount=args.maxcount, workers=args.workers, progress=not args.no_progress))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{index['num_samples']} samples in {len(index['shards'])} shards, {index['num_skipped']} skipped "
          f"{index['skipped_by_reason']} -> {args.output}/index.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
