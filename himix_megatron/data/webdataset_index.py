"""Index existing webdataset tars in place: sidecars and an index.json, never a copy of the images.

A webdataset tar holds samples as consecutive members sharing a key (`dir/0001.jpg`, `dir/0001.json`: key
`dir/0001`, webdataset's own rule: the name up to the first dot of its last path component). This module
accepts samples that hold

- one conversation member, the `json` member by default (`--wds-json-member`), a JSON object whose
  `conversations` list (`--wds-conversations-key`) is LLaVA's: `[{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}, ...]`; its `id` is kept when present (else the key), as is a `meta` object;
- at most one image member, any of `jpg jpeg png webp bmp gif tif tiff` by default (`--wds-image-members`);
  a sample without one is text-only;
- any other members (`txt`, `cls`, img2dataset's metadata, ...), which are ignored.

Every sample is checked as the shard builder checks its inputs (data/sources.py `prepare`: the conversation's
structure, the image fully decoding, a single image) and its tar headers as the loader does; a bad sample is
skipped and counted with its reason, like the builder's. For each tar, a sidecar records the byte span of
every good sample (its first header to the end of its last member: skipped samples stay in the tar, between
spans), a CRC32 of those bytes, its key, whether it has an image, and where its conversation member lies (the
data-parallel planner reads only that). `index.json` lists the tars (paths relative to it), their sidecars and
the member layout, so the loader decodes these samples with the layout instead of the builder's `json` record.

Tars written by webdataset's TarWriter carry a pax header before every member (its float mtime); pax and GNU
long-name headers are read, and so are directory and other non-file members, which webdataset skips too.
Compressed tars (`.tar.gz` and the like) cannot be read by byte offset: they are refused with the reason, or
with `--rewrite-compressed` decompressed once into the output directory and indexed there.

Sidecars go into the output directory (the tars' own directory, or any other: a read-only dataset mount
works), named after the tar with a hash of its path. A rerun reuses every sidecar whose tar (path, size and
modification time) and options are unchanged, so an interrupted indexing resumes; `index.json` is written last.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import json
import logging
import lzma
import multiprocessing as mp
import os
import re
import shutil
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Sequence

from himix_megatron.data import shards as S
from himix_megatron.data.records import DataError, SampleError
from himix_megatron.data.shards import ShardSample

log = logging.getLogger(__name__)

INDEXER_VERSION = 1
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_BLOCK = 512
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext
_COMPRESSED = ((b"\x1f\x8b", "gzip", gzip.open), (b"BZh", "bzip2", bz2.open),
               (b"\xfd7zXZ\x00", "xz", lzma.open), (b"\x28\xb5\x2f\xfd", "zstd", None))
_TEMPORARY = re.compile(r"(index\.json|.+-[0-9a-f]{10}\.(meta\.json|tar))\.tmp\.\d+")
_TAR_NAMES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tzst")


@dataclass(frozen=True)
class Layout:
    """Which members of a webdataset sample hold what."""

    json: str = "json"  # the conversation member's extension
    conversations: str = "conversations"  # the key of the LLaVA conversation list in it
    images: tuple[str, ...] = IMAGE_MEMBERS

    def __post_init__(self):
        if not self.json or "/" in self.json:
            raise DataError(f"--wds-json-member {self.json!r}: not a member extension")
        if not self.conversations:
            raise DataError("--wds-conversations-key must not be empty")
        if not self.images or self.json in self.images:
            raise DataError(f"--wds-image-members {','.join(self.images)}: must be non-empty and not name the "
                            f"conversation member {self.json!r}")

    @classmethod
    def from_index(cls, value, where: str) -> "Layout":
        try:
            return cls(str(value["json"]), str(value["conversations"]), tuple(str(v) for v in value["images"]))
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: bad 'layout' {value!r} ({e})") from None

    def record(self, obj, key: str, has_image: bool, source: str) -> dict:
        """The record the loader reads (what the builder writes as its json member) from a conversation member."""
        if not isinstance(obj, dict):
            raise SampleError("malformed record", f"{source}: the {self.json} member is {type(obj).__name__}, "
                              "not an object")
        if self.conversations not in obj:
            raise SampleError("malformed conversation", f"{source}: no {self.conversations!r} in the {self.json} "
                              f"member (keys: {sorted(obj)[:8]}; --wds-conversations-key names another)")
        record = {"id": str(obj["id"]) if obj.get("id") is not None else key,
                  "conversations": obj[self.conversations], "source": source, "has_image": has_image}
        if isinstance(obj.get("meta"), dict):
            record["meta"] = obj["meta"]
        return record


@dataclass
class _Member:
    header: int  # offset of its first header (pax / GNU long-name headers included)
    data: int  # offset of its data
    size: int
    name: str
    regular: bool

    @property
    def end(self) -> int:
        return self.data + (self.size + _BLOCK - 1) // _BLOCK * _BLOCK


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (sizes of 8 GiB and more)
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.rstrip(b"\0 ").decode("ascii").strip()
    return int(text, 8) if text else 0


def _pax(data: bytes, where: str) -> dict:
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "replace")
        pos += length
    return records


def members(read, where: str, start: int = 0, stop: Optional[int] = None) -> Iterator[_Member]:
    """The members of a tar (or of a byte range of one) as webdataset reads them: `read(offset, n)` gives bytes.
    Checks every header's checksum; raises SampleError('corrupt shard') where the tar cannot be read on."""
    pos, pending, first = start, {}, None
    while stop is None or pos < stop:
        header = read(pos, _BLOCK)
        if len(header) < _BLOCK:
            if stop is None and not header:
                return  # no end-of-archive blocks: tolerated, as tarfile does
            raise SampleError("corrupt shard", f"{where}: truncated tar header at byte {pos}")
        if header == bytes(_BLOCK):
            if stop is not None:
                raise SampleError("corrupt shard", f"{where}: end of archive inside a sample at byte {pos}")
            return
        try:
            stored, size = _number(header[148:156]), _number(header[124:136])
        except (ValueError, UnicodeDecodeError):
            raise SampleError("corrupt shard", f"{where}: unreadable tar header at byte {pos}") from None
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise SampleError("corrupt shard", f"{where}: tar header checksum mismatch at byte {pos}")
        kind = header[156:157]
        first = pos if first is None else first
        data = pos + _BLOCK
        if kind in (b"x", b"g", b"L", b"K"):  # pax local / global, GNU long name / link: apply to what follows
            payload = read(data, size)
            if len(payload) < size:
                raise SampleError("corrupt shard", f"{where}: truncated tar member at byte {pos}")
            try:
                if kind == b"x":
                    pending.update(_pax(payload, where))
                elif kind == b"L":
                    pending["path"] = payload.rstrip(b"\0").decode("utf-8", "replace")
            except (ValueError, UnicodeDecodeError):
                raise SampleError("corrupt shard", f"{where}: unreadable pax header at byte {pos}") from None
            pos = data + (size + _BLOCK - 1) // _BLOCK * _BLOCK
            continue
        name = header[:100].rstrip(b"\0")
        if header[257:262] == b"ustar" and header[345:500].rstrip(b"\0"):
            name = header[345:500].rstrip(b"\0") + b"/" + name
        name = pending.get("path", name.decode("utf-8", "replace"))
        if "size" in pending:
            size = int(pending["size"])
        member = _Member(first, data, size, name, kind in (b"0", b"\0", b"7"))
        pending, first = {}, None
        pos = member.end
        yield member


def split_key(name: str) -> tuple[Optional[str], Optional[str]]:
    """webdataset's (key, extension) of a member name, the extension lower-cased; (None, None) if it has none."""
    match = _KEY.match(name)
    return (match[1], match[2].lower()) if match else (None, None)


def group_samples(found: Iterator[_Member]) -> Iterator[list[_Member]]:
    """Consecutive regular members with one key form a sample, as webdataset groups them; members without an
    extension, or not regular files, belong to no sample."""
    group, key = [], None
    for member in found:
        k, _ = split_key(member.name) if member.regular else (None, None)
        if k is None or k.startswith("__"):
            continue
        if group and k != key:
            yield group
            group = []
        group.append(member)
        key = k
    if group:
        yield group


def sample_from_members(named: list[tuple[str, bytes]], layout: Layout, where: str) -> ShardSample:
    """A sample's (member name, bytes) -> the ShardSample the loader encodes; SampleError when it cannot be."""
    keys = {split_key(name)[0] for name, _ in named}
    if len(keys) != 1:
        raise SampleError("corrupt shard", f"{where}: members of several samples {sorted(map(str, keys))}")
    key = keys.pop()
    conversation, images = None, []
    for name, data in named:
        ext = split_key(name)[1]
        if ext == layout.json:
            try:
                conversation = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SampleError("malformed record", f"{where}: bad {layout.json} member ({e})") from None
        elif ext in layout.images:
            images.append((ext, data))
    if conversation is None:
        raise SampleError("malformed record", f"{where}: no {layout.json} member (members: "
                          f"{[n for n, _ in named]}; --wds-json-member names another)")
    if len(images) > 1:
        raise SampleError("multiple images", f"{where}: {len(images)} image members {[e for e, _ in images]}")
    record = layout.record(conversation, key, bool(images), where)
    ext, image = images[0] if images else (None, None)
    return ShardSample(key, record, image, ext)


def decode_sample(buf: bytes, layout: Layout, where: str) -> ShardSample:
    """One sample's bytes (its sidecar span) -> ShardSample, as the loader reads an in-place tar."""
    found = list(members(lambda pos, n: buf[pos:pos + n], where, 0, len(buf)))
    named = [(m.name, buf[m.data:m.data + m.size]) for m in found if m.regular and split_key(m.name)[0]]
    return sample_from_members(named, layout, where)


# --- indexing -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexConfig:
    inputs: tuple[str, ...]  # directories, globs or files
    output: str
    layout: Layout = Layout()
    workers: int = 1
    rewrite_compressed: bool = False
    progress: bool = True

    def __post_init__(self):
        if not self.inputs:
            raise DataError("no --webdataset inputs")
        if self.workers < 1:
            raise DataError(f"--workers={self.workers} must be >= 1")


def find_tars(inputs: Sequence[str]) -> list[str]:
    """Every tar the inputs name, in order, each once: a directory's tars sorted by name, a glob's matches."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            matches = sorted(os.path.join(item, n) for n in os.listdir(item) if n.endswith(_TAR_NAMES))
            what = "holds no tar files"
        elif glob.has_magic(item):
            matches = sorted(m for m in glob.glob(item) if os.path.isfile(m))
            what = "matches no file"
        else:
            matches = [item] if os.path.isfile(item) else []
            what = "is not a file or directory"
        if not matches:
            raise DataError(f"--webdataset {item!r} {what}")
        found += [os.path.abspath(m) for m in matches]
    return list(dict.fromkeys(found))


def compression(path: str) -> Optional[str]:
    with open(path, "rb") as f:
        head = f.read(6)
    return next((name for magic, name, _ in _COMPRESSED if head.startswith(magic)), None)


def _tag(path: str) -> str:
    stem = os.path.basename(path)
    for suffix in _TAR_NAMES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{stem}-{hashlib.sha256(path.encode()).hexdigest()[:10]}"


def _fingerprint(path: str, layout: Layout) -> str:
    st = os.stat(path)
    spec = [INDEXER_VERSION, path, st.st_size, st.st_mtime_ns, asdict(layout)]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def _decompress(path: str, kind: str, output: str) -> str:
    opener = next(open_ for _, name, open_ in _COMPRESSED if name == kind)
    if opener is None:
        raise DataError(f"{path}: {kind}-compressed, which this Python cannot decompress; decompress it "
                        f"(zstd -d) and index the .tar")
    target = os.path.join(output, _tag(path) + ".tar")
    tmp = f"{target}.tmp.{os.getpid()}"
    with opener(path, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, target)
    return target


def _index_tar(task: tuple) -> dict:
    """One input tar -> its sidecar (written), returned without the per-sample arrays."""
    source, output, layout = task
    sidecar = os.path.join(output, _tag(source) + ".meta.json")
    fingerprint = _fingerprint(source, layout)
    try:
        with open(sidecar, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("fingerprint") == fingerprint and os.path.getsize(meta["tar"]) == meta["bytes"]:
            return _summary(meta, sidecar, resumed=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    kind = compression(source)
    tar = _decompress(source, kind, output) if kind else source
    meta = scan(tar, layout)
    meta.update(source=source, tar=tar, fingerprint=fingerprint)
    S._atomic_write_json(sidecar, meta)
    return _summary(meta, sidecar, resumed=False)


def _summary(meta: dict, sidecar: str, resumed: bool) -> dict:
    return {key: meta[key] for key in ("source", "tar", "count", "bytes", "skipped", "problem")} | {
        "sidecar": sidecar, "resumed": resumed}


def scan(path: str, layout: Layout) -> dict:
    """Read a tar once: the spans, CRCs and checks of its samples (the sidecar's fields)."""
    from himix_megatron.data.sources import RawRecord, prepare

    name = os.path.basename(path)
    keys, starts, ends, crc, spans, images, skipped, problem = [], [], [], [], [], [], [], ""
    with open(path, "rb") as f:
        def read(offset: int, n: int) -> bytes:
            return os.pread(f.fileno(), n, offset)

        number = -1
        try:
            for group in group_samples(members(read, name)):
                number += 1
                start, end = group[0].header, group[-1].end
                buf = read(start, end - start)
                key = split_key(group[0].name)[0]
                where = f"{name}:{key}"
                named = [(m.name, buf[m.data - start:m.data - start + m.size]) for m in group]
                try:
                    if len(buf) < end - start:
                        raise SampleError("corrupt shard", f"{where}: truncated tar member")
                    sample = sample_from_members(named, layout, where)
                    # The builder's checks of an input record: conversation, image decoding, one image.
                    prepare(RawRecord(name, number, sample.record, image_bytes=sample.image), key, None)
                except SampleError as e:
                    skipped.append({"source": name, "index": number, "id": key, "reason": e.reason,
                                    "detail": e.detail})
                    continue
                conv = next(m for m in group if split_key(m.name)[1] == layout.json)
                keys.append(key)
                starts.append(start)
                ends.append(end)
                crc.append(zlib.crc32(buf))
                spans.append([conv.data, conv.size])
                images.append(sample.image is not None)
        except SampleError as e:  # the tar cannot be read past here: keep what came before
            problem = e.detail
    return {"name": name, "count": len(keys), "bytes": os.path.getsize(path), "keys": keys, "offsets": starts,
            "ends": ends, "crc32": crc, "record_spans": spans, "has_image": images, "skipped": skipped,
            "problem": problem}


def index_webdataset(cfg: IndexConfig) -> dict:
    """Index (or finish indexing) the tars; returns the index, also written to `cfg.output`/index.json."""
    from tqdm import tqdm

    tars = find_tars(cfg.inputs)
    for path in tars:
        kind = compression(path)
        if kind and not cfg.rewrite_compressed:
            raise DataError(f"{path}: {kind}-compressed. The loader reads a sample with one read at its byte "
                            "offset, which a compressed stream does not have: decompress it in place "
                            f"({'gunzip' if kind == 'gzip' else kind + ' -d'}), or pass --rewrite-compressed to write "
                            "an uncompressed copy into the output directory")
    os.makedirs(cfg.output, exist_ok=True)
    for name in os.listdir(cfg.output):
        if _TEMPORARY.fullmatch(name):  # ours, left by a crashed run (the output may be the tars' directory)
            os.remove(os.path.join(cfg.output, name))
    tasks = [(path, cfg.output, cfg.layout) for path in tars]
    bar = tqdm(total=sum(os.path.getsize(p) for p in tars), unit="B", unit_scale=True,
               desc=f"index -> {cfg.output}", disable=not cfg.progress)
    results = []
    try:
        if cfg.workers == 1 or len(tasks) == 1:
            found = map(_index_tar, tasks)
        else:
            pool = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("fork"))
            found = pool.map(_index_tar, tasks)
        for path, result in zip(tars, found):
            results.append(result)
            bar.update(os.path.getsize(path))
    finally:
        bar.close()
        if cfg.workers > 1 and len(tasks) > 1:
            pool.shutdown()
    resumed = sum(r["resumed"] for r in results)
    if resumed:
        log.info("%s: %d of %d tars indexed earlier, kept", cfg.output, resumed, len(results))
    index = _index(cfg, results)
    S.write_index(cfg.output, index)
    reasons = ", ".join(f"{r}: {n}" for r, n in index["skipped_by_reason"].items()) or "none"
    log.info("%s: %d samples in %d tars; skipped %d (%s)", cfg.output, index["num_samples"], len(results),
             index["num_skipped"], reasons)
    for r in results:
        if r["problem"]:
            log.warning("%s: unreadable from there on, its later samples are not indexed: %s", r["tar"], r["problem"])
    return index


def _index(cfg: IndexConfig, results: list[dict]) -> dict:
    skipped = [s for r in results for s in r["skipped"]]
    fingerprint = hashlib.sha256(json.dumps([r["sidecar"] for r in results]
                                            + [json.load(open(r["sidecar"], encoding="utf-8"))["fingerprint"]
                                               for r in results]).encode()).hexdigest()[:16]
    return {
        "format": S.FORMAT,
        "version": S.VERSION,
        "fingerprint": fingerprint,
        "layout": asdict(cfg.layout),
        "inputs": [r["source"] for r in results],
        "num_samples": sum(r["count"] for r in results),
        "num_skipped": len(skipped),
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped).most_common()),
        "unreadable": {r["tar"]: r["problem"] for r in results if r["problem"]},
        "shards": [{"name": os.path.relpath(r["tar"], cfg.output), "meta": os.path.basename(r["sidecar"]),
                    "count": r["count"], "bytes": r["bytes"]} for r in results],
        "skipped": skipped,
    }
