"""Webdataset tar shards: the on-disk format, atomic writing, and random-access reading.

Layout of a shard directory:
- `shard-000000.tar`, ...: webdataset tars. Each sample is `<key>.json` (id, conversations, source)
  followed, if the sample has an image, by `<key>.<ext>` holding the original encoded bytes
  (`jpg`, `png`, ...). Keys are the zero-padded input record number, unique within the directory.
- `shard-000000.meta.json`: per-shard sidecar with the byte offset of every sample, a CRC32 of each
  sample's bytes, the keys, and the input samples skipped while building that shard.
- `index.json`: shard names and counts, and every skipped sample with its reason.

Any webdataset reader can stream the tars. Our loader uses the sidecar offsets to read sample i
directly (one pread), which is what makes exact shuffling and resumption cheap, and the CRC to
refuse a damaged sample instead of training on it.

Files are written to a temporary name and renamed, so a crash never leaves a complete-looking shard.

Existing webdataset tars indexed in place (data/webdataset_index.py, `tools/build_shards.py --webdataset`) are
read through the same classes: their index names the tars (paths relative to it), each tar's sidecar (`meta`),
and the member `layout`; a sidecar there gives each sample's end as well (skipped samples stay in the tar,
between spans), where its conversation member lies, and whether it has an image.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from himix_megatron.data.records import DataError, SampleError

FORMAT = "himix-webdataset"
VERSION = 1
INDEX_FILE = "index.json"
_BLOCK = 512


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def meta_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".meta.json"


@dataclass
class ShardSample:
    key: str
    record: dict  # the json member
    image: Optional[bytes] = None
    image_ext: Optional[str] = None


def _atomic_write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_index(directory: str, index: dict) -> None:
    _atomic_write_json(os.path.join(directory, INDEX_FILE), index)


def write_meta(directory: str, tar_name: str, meta: dict) -> None:
    _atomic_write_json(os.path.join(directory, meta_name(tar_name)), meta)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # byte-identical rebuilds
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, samples: Iterable[ShardSample]) -> dict:
    """Write a tar atomically and return its offsets/CRC metadata (no `skipped` yet)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    keys, offsets = [], []
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples:
                if not s.key or "." in s.key or "/" in s.key:
                    raise DataError(f"invalid sample key {s.key!r}: must be non-empty, without '.' or '/'")
                offsets.append(tar.offset)
                keys.append(s.key)
                _add(tar, f"{s.key}.json", json.dumps(s.record, ensure_ascii=False).encode("utf-8"))
                if s.image is not None:
                    _add(tar, f"{s.key}.{s.image_ext}", s.image)
            offsets.append(tar.offset)
        f.flush()
        os.fsync(f.fileno())
    with open(tmp, "rb") as f:
        data = f.read()
    crc = [zlib.crc32(data[offsets[i] : offsets[i + 1]]) for i in range(len(keys))]
    os.replace(tmp, path)
    return {
        "name": os.path.basename(path),
        "count": len(keys),
        "bytes": len(data),
        "keys": keys,
        "offsets": offsets,
        "crc32": crc,
    }


def _octal(field_bytes: bytes) -> int:
    text = field_bytes.rstrip(b"\0 ").decode("ascii")
    return int(text, 8) if text else 0


def parse_members(buf: bytes, where: str) -> list[tuple[str, bytes]]:
    """Split one sample's bytes into (name, data) tar members, checking every header checksum.

    Only the plain ustar regular-file members our writer emits are accepted; anything else means the
    shard is not what its sidecar describes.
    """
    members, pos = [], 0
    while pos < len(buf):
        header = buf[pos : pos + _BLOCK]
        if len(header) < _BLOCK:
            raise SampleError("corrupt shard", f"{where}: truncated tar header")
        try:
            stored = _octal(header[148:156])
            size = _octal(header[124:136])
        except (ValueError, UnicodeDecodeError):
            raise SampleError("corrupt shard", f"{where}: unreadable tar header") from None
        actual = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != actual:
            raise SampleError("corrupt shard", f"{where}: tar header checksum mismatch")
        if header[156:157] not in (b"0", b"\0"):
            raise SampleError("corrupt shard", f"{where}: unexpected tar member type {header[156:157]!r}")
        name = header[:100].rstrip(b"\0")
        prefix = header[345:500].rstrip(b"\0") if header[257:262] == b"ustar" else b""
        if prefix:
            name = prefix + b"/" + name
        start = pos + _BLOCK
        data = buf[start : start + size]
        if len(data) < size:
            raise SampleError("corrupt shard", f"{where}: truncated tar member {name!r}")
        members.append((name.decode("utf-8", "replace"), data))
        pos = start + (size + _BLOCK - 1) // _BLOCK * _BLOCK
    return members


def decode_sample(buf: bytes, key: Optional[str], where: str) -> ShardSample:
    """Members of one sample -> ShardSample. Raises SampleError('corrupt shard') on any mismatch."""
    members = parse_members(buf, where)
    record, image, ext, seen_key = None, None, None, None
    for name, data in members:
        k, _, suffix = name.partition(".")
        if seen_key is None:
            seen_key = k
        if k != seen_key or (key is not None and k != key):
            raise SampleError("corrupt shard", f"{where}: member {name!r} does not belong to sample {key}")
        if suffix == "json":
            try:
                record = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SampleError("corrupt shard", f"{where}: bad json member ({e})") from None
        elif image is None:
            image, ext = data, suffix
        else:
            raise SampleError("corrupt shard", f"{where}: more than one image member")
    if not isinstance(record, dict):
        raise SampleError("corrupt shard", f"{where}: no json object member")
    if bool(record.get("has_image")) != (image is not None):
        raise SampleError("corrupt shard", f"{where}: has_image={record.get('has_image')} but image member "
                          f"{'present' if image is not None else 'missing'}")
    return ShardSample(seen_key or "", record, image, ext)


@dataclass
class Shard:
    """One tar as the loader sees it. `readable` samples are [0, readable); the rest are lost."""

    path: str
    count: int
    offsets: Optional[np.ndarray] = None
    crc32: Optional[np.ndarray] = None
    readable: int = 0
    problem: str = ""  # why samples >= readable cannot be read
    # In-place webdataset tars (data/webdataset_index.py): sample i is [offsets[i], ends[i]), its conversation
    # member's data [record_spans[i, 0], + record_spans[i, 1]), decoded with `layout`.
    ends: Optional[np.ndarray] = None
    record_spans: Optional[np.ndarray] = None
    has_image: Optional[np.ndarray] = None
    layout: Optional[object] = None

    def end(self, i: int) -> int:
        return int(self.ends[i]) if self.ends is not None else int(self.offsets[i + 1])


@dataclass
class ShardDirectory:
    """A built directory: shards, their sidecars, and a global sample numbering across them."""

    root: str
    shards: list[Shard] = field(default_factory=list)

    @classmethod
    def open(cls, root: str) -> "ShardDirectory":
        path = os.path.join(root, INDEX_FILE)
        if not os.path.isfile(path):
            raise DataError(f"{root}: no {INDEX_FILE}; build it with tools/build_shards.py")
        try:
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: unreadable ({e})") from None
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise DataError(f"{path}: format {index.get('format')}/{index.get('version')}, expected {FORMAT}/{VERSION}")
        out = cls(root)
        layout = None
        if "layout" in index:
            from himix_megatron.data.webdataset_index import Layout

            layout = Layout.from_index(index["layout"], path)
        for entry in index.get("shards", []):
            out.shards.append(_open_shard(root, entry, layout))
        if not out.shards:
            raise DataError(f"{path}: lists no shards")
        return out

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def num_lost(self) -> int:
        return sum(s.count - s.readable for s in self.shards)

    def problems(self) -> list[str]:
        return [f"{s.path}: {s.count - s.readable} of {s.count} samples unreadable ({s.problem})"
                for s in self.shards if s.readable < s.count]


def _open_shard(root: str, entry: dict, layout=None) -> Shard:
    try:
        name, count = entry["name"], int(entry["count"])
        sidecar = str(entry.get("meta") or meta_name(name))
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{root}/{INDEX_FILE}: bad shard entry {entry!r}") from None
    shard = Shard(os.path.join(root, name), count, layout=layout)
    try:
        with open(os.path.join(root, sidecar), encoding="utf-8") as f:
            meta = json.load(f)
        offsets = np.asarray(meta["offsets"], dtype=np.int64)
        crc = np.asarray(meta["crc32"], dtype=np.uint32)
        if layout is not None:  # in place: a start and an end per sample
            shard.ends = np.asarray(meta["ends"], dtype=np.int64)
            shard.record_spans = np.asarray(meta["record_spans"], dtype=np.int64).reshape(-1, 2)
            shard.has_image = np.asarray(meta["has_image"], dtype=bool)
            if not len(offsets) == len(shard.ends) == len(shard.record_spans) == len(shard.has_image) == count:
                raise ValueError(f"{len(offsets)} spans for {count} samples")
        elif len(offsets) != count + 1:
            raise ValueError(f"{len(offsets)} offsets for {count} samples")
        if len(crc) != count:
            raise ValueError(f"{len(crc)} entries for {count} samples")
    except (OSError, ValueError, KeyError, TypeError) as e:
        shard.problem = f"sidecar {sidecar} unusable: {e}"
        shard.ends = shard.record_spans = shard.has_image = None
        return shard
    try:
        size = os.path.getsize(shard.path)
    except OSError:
        shard.problem = "shard file missing"
        return shard
    shard.offsets, shard.crc32 = offsets, crc
    # Samples whose bytes end past the end of the file were cut off (e.g. an interrupted copy).
    ends = shard.ends if shard.ends is not None else offsets[1:]
    shard.readable = int(np.searchsorted(ends, size, side="right"))
    if shard.readable < count:
        shard.problem = f"truncated shard: {size} of {int(ends[-1])} bytes"
    return shard


class ShardReader:
    """Reads samples by (shard, index) with pread. One per process; reopens files after fork."""

    def __init__(self, max_open: int = 64):
        self._max_open = max_open
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def _fd(self, path: str) -> int:
        if self._pid != os.getpid():  # forked: the inherited table belongs to the parent
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.pop(path, None)
        if fd is None:
            if len(self._fds) >= self._max_open:
                oldest = next(iter(self._fds))
                os.close(self._fds.pop(oldest))
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise SampleError("corrupt shard", f"{path}: cannot open ({e.strerror})") from None
        self._fds[path] = fd  # most recently used last
        return fd

    def read(self, shard: Shard, i: int) -> ShardSample:
        where = f"{shard.path} sample {i}"
        if i >= shard.readable:
            raise SampleError("corrupt shard", f"{where}: {shard.problem}")
        start, end = int(shard.offsets[i]), shard.end(i)
        buf = os.pread(self._fd(shard.path), end - start, start)
        if len(buf) != end - start:
            raise SampleError("corrupt shard", f"{where}: truncated shard (short read)")
        if zlib.crc32(buf) != int(shard.crc32[i]):
            raise SampleError("corrupt shard", f"{where}: checksum mismatch")
        if shard.layout is not None:
            from himix_megatron.data import webdataset_index

            return webdataset_index.decode_sample(buf, shard.layout, where)
        return decode_sample(buf, None, where)

    def read_record(self, shard: Shard, i: int) -> dict:
        """Only sample i's json member (the writer puts it first): what the data-parallel planner needs to
        know a sample's text length without reading its image. Not checksummed (that takes the whole
        sample); a damaged sample fails its CRC when its own rank reads it with `read`."""
        where = f"{shard.path} sample {i}"
        if i >= shard.readable:
            raise SampleError("corrupt shard", f"{where}: {shard.problem}")
        if shard.layout is not None:
            return self._read_webdataset_record(shard, i, where)
        start, end = int(shard.offsets[i]), int(shard.offsets[i + 1])
        fd = self._fd(shard.path)
        buf = os.pread(fd, min(end - start, 8 * _BLOCK), start)
        if len(buf) < _BLOCK:
            raise SampleError("corrupt shard", f"{where}: truncated shard (short read)")
        try:
            size = _octal(buf[124:136])
        except (ValueError, UnicodeDecodeError):
            raise SampleError("corrupt shard", f"{where}: unreadable tar header") from None
        need = min(_BLOCK + (size + _BLOCK - 1) // _BLOCK * _BLOCK, end - start)
        if need > len(buf):
            buf = os.pread(fd, need, start)
        members = parse_members(buf[:need], where)
        name, data = members[0]
        if not name.endswith(".json"):
            raise SampleError("corrupt shard", f"{where}: first member {name!r} is not the json record")
        try:
            record = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SampleError("corrupt shard", f"{where}: bad json member ({e})") from None
        if not isinstance(record, dict):
            raise SampleError("corrupt shard", f"{where}: no json object member")
        return record

    def _read_webdataset_record(self, shard: Shard, i: int, where: str) -> dict:
        start, size = (int(v) for v in shard.record_spans[i])
        data = os.pread(self._fd(shard.path), size, start)
        if len(data) != size:
            raise SampleError("corrupt shard", f"{where}: truncated shard (short read)")
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SampleError("corrupt shard", f"{where}: bad json member ({e})") from None
        return shard.layout.record(obj, "", bool(shard.has_image[i]), where)

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}
