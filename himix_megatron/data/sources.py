"""Input readers for the shard builder, and the check that turns one input record into a shard sample.

Inputs:
- LLaVA JSON (a list) or JSONL: `{"id", "image": relative path (optional), "conversations": [...]}`,
  images resolved against `--image-folder`;
- LLaVA-OneVision parquet: columns `id`, `image` (struct with `bytes`, or null / absent for text-only),
  `conversations` (list of {from, value}); read one row group range at a time, never whole.

Records are numbered in input order (JSON files first, then parquet files, each in the order given),
which fixes shard contents independently of how many workers build them.

Multi-image records are skipped and counted ("multiple images"): HiMix, like LLaVA-1.5, feeds one
image per sample, and keeping only the first image would leave questions about the others unanswerable.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from himix_megatron.data.image import image_format
from himix_megatron.data.records import DataError, SampleError, parse_conversation
from himix_megatron.data.shards import ShardSample


@dataclass
class RawRecord:
    source: str  # file name, for reports
    index: int  # position within that file
    obj: Any  # the record as read (dict for valid input)
    image_bytes: Optional[bytes] = None  # parquet / in-memory sources carry bytes
    image_path: Any = None  # JSON sources carry the "image" field (str, list, or None)


class Source:
    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> list[RawRecord]:
        raise NotImplementedError

    def fingerprint(self) -> list:
        st = os.stat(self.path)
        return [os.path.abspath(self.path), st.st_size, st.st_mtime_ns]


class JsonSource(Source):
    """A JSON list or JSONL file, loaded whole on first use (LLaVA's own loaders do the same)."""

    def __init__(self, path: str):
        self.path, self.name = path, os.path.basename(path)
        self._records: Optional[list] = None
        self._len = len(self._load())

    def _load(self) -> list:
        if self._records is None:
            try:
                with open(self.path, encoding="utf-8") as f:
                    if self.path.endswith(".jsonl"):
                        self._records = [_jsonl_line(line, self.path, n) for n, line in enumerate(f) if line.strip()]
                    else:
                        data = json.load(f)
                        if not isinstance(data, list):
                            raise DataError(f"{self.path}: top level is {type(data).__name__}, expected a list")
                        self._records = data
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{self.path}: cannot read JSON input ({e})") from None
        return self._records

    def __len__(self) -> int:
        return self._len

    def read(self, start: int, stop: int) -> list[RawRecord]:
        recs = self._load()
        out = []
        for i in range(start, stop):
            obj = recs[i]
            path = obj.get("image") if isinstance(obj, dict) else None
            out.append(RawRecord(self.name, i, obj, image_path=path))
        return out


def _jsonl_line(line: str, path: str, n: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        # One bad line is one bad sample, reported with the others, not a failed build.
        return {"__unparsable__": f"{path} line {n + 1}"}


class ParquetSource(Source):
    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self.path, self.name = path, os.path.basename(path)
        self._pid = os.getpid()
        try:
            self._file = pq.ParquetFile(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        names = set(self._file.schema_arrow.names)
        if "conversations" not in names:
            raise DataError(f"{path}: no 'conversations' column (columns: {sorted(names)})")
        self._columns = [c for c in ("id", "image", "conversations") if c in names]
        md = self._file.metadata
        self._group_rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        self._len = sum(self._group_rows)

    def __getstate__(self):  # ParquetFile holds a native handle; workers reopen by path
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __len__(self) -> int:
        return self._len

    def read(self, start: int, stop: int) -> list[RawRecord]:
        if self._pid != os.getpid():  # forked builder worker: use a handle of its own
            self.__init__(self.path)
        groups, first, pos = [], None, 0
        for g, n in enumerate(self._group_rows):
            if pos + n > start and pos < stop:
                groups.append(g)
                first = pos if first is None else first
            pos += n
        if not groups:
            return []
        table = self._file.read_row_groups(groups, columns=self._columns)
        table = table.slice(start - first, stop - start)
        out = []
        for j, row in enumerate(table.to_pylist()):
            image = row.pop("image", None)
            data = None
            if isinstance(image, dict):
                data = image.get("bytes")
                if data is None and image.get("path"):
                    row["__missing_image__"] = image["path"]
            elif isinstance(image, list):
                row["__image_count__"] = len(image)
            conv = row.get("conversations")
            if isinstance(conv, str):  # some exports store the list as a JSON string
                try:
                    row["conversations"] = json.loads(conv)
                except json.JSONDecodeError:
                    pass
            out.append(RawRecord(self.name, start + j, row, image_bytes=data))
        return out


class MemorySource(Source):
    """Records generated in memory (synthetic data); each may carry `image_bytes`."""

    def __init__(self, name: str, records: Sequence[RawRecord]):
        self.name, self._records = name, list(records)

    def __len__(self) -> int:
        return len(self._records)

    def read(self, start: int, stop: int) -> list[RawRecord]:
        return self._records[start:stop]

    def fingerprint(self) -> list:
        return [self.name, len(self._records)]


def expand(patterns: Sequence[str], what: str) -> list[str]:
    """Expand globs in input order; a pattern that matches nothing is an error, not an empty input."""
    out = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise DataError(f"{what} input {pattern!r}: no such file")
        out.extend(matches)
    return out


def open_sources(json_paths: Sequence[str] = (), parquet_paths: Sequence[str] = ()) -> list[Source]:
    sources: list[Source] = [JsonSource(p) for p in expand(json_paths, "--json")]
    sources += [ParquetSource(p) for p in expand(parquet_paths, "--parquet")]
    return sources


def prepare(rec: RawRecord, key: str, image_folder: Optional[str]) -> ShardSample:
    """Check one record and load its image; raises SampleError with the reason to skip it."""
    obj = rec.obj
    where = f"{rec.source}#{rec.index}"
    if not isinstance(obj, dict):
        raise SampleError("malformed record", f"{where}: {type(obj).__name__}, not an object")
    if "__unparsable__" in obj:
        raise SampleError("malformed record", f"{obj['__unparsable__']}: invalid JSON")
    image = rec.image_bytes
    path = rec.image_path
    if isinstance(path, list):
        if len(path) > 1:
            raise SampleError("multiple images", f"{where}: {len(path)} images")
        path = path[0] if path else None
    if obj.get("__image_count__", 0) > 1:
        raise SampleError("multiple images", f"{where}: {obj['__image_count__']} images")
    if "__missing_image__" in obj:
        raise SampleError("missing image", f"{where}: image struct has a path but no bytes")
    if image is None and path:
        if not isinstance(path, str):
            raise SampleError("malformed record", f"{where}: 'image' is {type(path).__name__}")
        if image_folder is None:
            raise DataError(f"{rec.source} refers to image files ({path}) but no --image-folder was given")
        full = os.path.join(image_folder, path)
        try:
            with open(full, "rb") as f:
                image = f.read()
        except OSError as e:
            raise SampleError("missing image", f"{where}: {full}: {e.strerror}") from None
    has_image = image is not None
    parse_conversation(obj.get("conversations"), has_image=has_image)
    ext = image_format(image, what=f"{where} image") if has_image else None
    record = {
        "id": str(obj["id"]) if obj.get("id") is not None else where,
        "conversations": obj["conversations"],
        "source": where,
        "has_image": has_image,
    }
    if isinstance(obj.get("meta"), dict):
        record["meta"] = obj["meta"]
    return ShardSample(key, record, image, ext)
