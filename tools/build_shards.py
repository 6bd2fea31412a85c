#!/usr/bin/env python
"""Turn LLaVA-format JSON/JSONL (+ image folder) and LLaVA-OneVision parquet files into webdataset shards,
or index existing webdataset tars in place.

    python tools/build_shards.py --json llava_v1_5_mix665k.json --image-folder data/ \
        --output shards/mix665k --workers 32
    python tools/build_shards.py --webdataset /data/wds/ --output shards/wds --workers 16

--webdataset DIR|GLOB|FILE (repeatable) writes only sidecars and index.json into --output, never a copy of a
tar: each sample's `json` member (--wds-json-member) holds a LLaVA `conversations` list
(--wds-conversations-key) and at most one image member (--wds-image-members; default jpg jpeg png webp bmp gif
tif tiff); other members are ignored. Samples are checked as the builder checks its inputs, and bad ones are
skipped and listed. Compressed tars are refused (--rewrite-compressed decompresses them into --output). See
himix_megatron/data/webdataset_index.py.

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
from himix_megatron.data.webdataset_index import IMAGE_MEMBERS, IndexConfig, Layout, index_webdataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="append", default=[], metavar="FILE",
                   help="LLaVA JSON list or JSONL file (repeatable, globs allowed)")
    p.add_argument("--parquet", action="append", default=[], metavar="FILE",
                   help="LLaVA-OneVision parquet file (repeatable, globs allowed)")
    p.add_argument("--image-folder", help="root that JSON 'image' paths are relative to")
    p.add_argument("--webdataset", action="append", default=[], metavar="DIR|GLOB",
                   help="existing webdataset tars to index in place (repeatable): a directory's *.tar, a glob, a file")
    p.add_argument("--wds-json-member", default="json", metavar="EXT",
                   help="--webdataset: the member holding the conversation (default json)")
    p.add_argument("--wds-conversations-key", default="conversations", metavar="KEY",
                   help="--webdataset: the LLaVA conversation list's key in that member (default conversations)")
    p.add_argument("--wds-image-members", default=",".join(IMAGE_MEMBERS), metavar="EXT,...",
                   help=f"--webdataset: image member extensions (default {','.join(IMAGE_MEMBERS)})")
    p.add_argument("--rewrite-compressed", action="store_true",
                   help="--webdataset: decompress compressed tars into --output instead of refusing them")
    p.add_argument("--output", required=True, metavar="DIR", help="the shard directory (--webdataset: the sidecars "
                   "and index.json; may be the tars' own directory)")
    p.add_argument("--maxcount", type=int, default=10000, help="input records per shard (default 10000)")
    p.add_argument("--workers", type=int, default=1, help="parallel shard writers")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.webdataset:
        return _index(p, args)
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


def _index(parser, args) -> int:
    if args.json or args.parquet or args.image_folder:
        parser.error("--webdataset indexes tars in place: it takes no --json, --parquet or --image-folder")
    try:
        layout = Layout(args.wds_json_member, args.wds_conversations_key,
                        tuple(e.strip().lower() for e in args.wds_image_members.split(",") if e.strip()))
        index = index_webdataset(IndexConfig(tuple(args.webdataset), args.output, layout, workers=args.workers,
                                             rewrite_compressed=args.rewrite_compressed,
                                             progress=not args.no_progress))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{index['num_samples']} samples in {len(index['shards'])} tars indexed in place, {index['num_skipped']} "
          f"skipped {index['skipped_by_reason']} -> {args.output}/index.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
