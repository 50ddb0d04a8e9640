"""The on-disk cache format: constants, paths, .npy headers, sealed JSON and manifest checks.

Everything here is pure bookkeeping (no data I/O beyond small JSON files); docs/cache-format.md
describes the same bytes for people reading a cache without kdpipe.
"""

from __future__ import annotations

import ast
import datetime
import json
import math
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.errors import KdpipeError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
JOURNAL = "journal.jsonl"
COMPLETE = "COMPLETE.json"
LOCK = "lock"
NPY_ALIGN = 64  # header padded so data starts on a 64-byte boundary (as NumPy does)

# storage dtype name -> little-endian NumPy dtype of the stored bytes (bfloat16 kept as its uint16 bits)
STORAGE: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
FLOAT_KINDS = ("float32", "float16", "bfloat16")
# keys kdpipe adds to the caller's manifest; never compared as configuration
ADDED_KEYS = ("format_version", "kdpipe_version", "created", "num_chunks", "shards", "seal")
# top-level key for free-form run information (host, command line, timings): never compared
RUN_KEY = "run"
# bounds that no real cache comes near, so that damaged numbers fail cleanly instead of overflowing
# int64 arithmetic or looping for hours over chunk or shard ranges
MAX_COUNT = 2**40
MAX_VIEWS = 2**20
MAX_CHUNKS = 2**24
MAX_SHARDS = 2**17
MAX_ITEM = 2**32  # elements of one per-item array (shape product)
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


# ----------------------------------------------------------------------------------------------- JSON
def _to_json(obj: Any) -> Any:
    """Plain JSON types from NumPy scalars/arrays, tuples, Paths (so comparisons are type-stable)."""
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _to_json(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def normalise(obj: Any) -> Any:
    """A JSON round trip of ``obj`` (raises KdpipeError on values JSON cannot hold)."""
    try:
        return json.loads(json.dumps(_to_json(obj), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise KdpipeError(
            f"cache manifest: value not storable as JSON ({e}); pass plain numbers/strings"
        ) from e


def canonical(obj: Any) -> bytes:
    """The canonical bytes a seal is computed over: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def seal(obj: dict) -> dict:
    """``obj`` plus ``"seal"``: zlib.crc32 of ``canonical(obj without "seal")``."""
    body = {k: v for k, v in obj.items() if k != "seal"}
    return {**body, "seal": zlib.crc32(canonical(body))}


def sealed_ok(obj: Any) -> bool:
    """True when ``obj`` is a dict whose seal matches its content."""
    if not isinstance(obj, dict) or not isinstance(obj.get("seal"), int):
        return False
    body = {k: v for k, v in obj.items() if k != "seal"}
    return zlib.crc32(canonical(body)) == obj["seal"]


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename/creation inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_tmp(path: Path, data: bytes) -> Path:
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:  # a full disk mid-write: leave no temp file behind
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def write_json_atomic(path: Path, obj: dict, exclusive: bool = False, indent: int | None = 1) -> bool:
    """Write ``obj`` as JSON to ``path`` atomically (tmp file, fsync, rename/link, fsync dir).

    With ``exclusive`` the file is only created when absent (hard link, atomic on local and NFS
    filesystems); returns False when another process created it first.
    """
    data = (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode("ascii")
    tmp = _write_tmp(path, data)
    try:
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # filesystems without hard links: best effort O_EXCL-style check
                if path.exists():
                    return False
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return True


def read_json(path: Path) -> Any:
    """Parsed JSON, or None when the file is missing or unreadable."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------- layout
def shard_dirname(i: int, n: int) -> str:
    return f"{i:05d}-of-{n:05d}"


def shard_chunks(i: int, n: int, num_chunks: int) -> tuple[int, int]:
    """Contiguous chunk range [c0, c1) owned by shard i of n (sizes differ by at most one)."""
    return i * num_chunks // n, (i + 1) * num_chunks // n


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: per-item ``shape``, storage ``dtype`` name, ``per`` "view" or "sample"."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    per: str

    @property
    def np_dtype(self) -> np.dtype:
        return STORAGE[self.dtype]

    def row_shape(self, num_views: int) -> tuple[int, ...]:
        """Shape of one sample's row: (V, *shape) per view, shape per sample."""
        return ((num_views,) if self.per == "view" else ()) + self.shape

    def row_bytes(self, num_views: int) -> int:
        return math.prod(self.row_shape(num_views)) * self.np_dtype.itemsize  # exact (no int64 wrap)


@dataclass(frozen=True)
class Layout:
    """Derived numbers of a manifest: sample/chunk counts and the shard split."""

    num_samples: int
    num_views: int
    chunk_size: int
    num_shards: int
    arrays: dict[str, ArraySpec]

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_range(self, c: int) -> tuple[int, int]:
        return c * self.chunk_size, min((c + 1) * self.chunk_size, self.num_samples)

    def shard_chunks(self, i: int) -> tuple[int, int]:
        return shard_chunks(i, self.num_shards, self.num_chunks)

    def shard_samples(self, i: int) -> tuple[int, int]:
        c0, c1 = self.shard_chunks(i)
        return min(c0 * self.chunk_size, self.num_samples), min(c1 * self.chunk_size, self.num_samples)

    def shard_of_chunk(self, c: int) -> int:
        # inverse of shard_chunks; small loops over shards are fine (not per sample)
        for i in range(self.num_shards):
            c0, c1 = self.shard_chunks(i)
            if c0 <= c < c1:
                return i
        raise IndexError(c)

    def file_shape(self, name: str, i: int) -> tuple[int, ...]:
        s0, s1 = self.shard_samples(i)
        return (s1 - s0,) + self.arrays[name].row_shape(self.num_views)

    def data_bytes(self, name: str, i: int) -> int:
        s0, s1 = self.shard_samples(i)
        return (s1 - s0) * self.arrays[name].row_bytes(self.num_views)

    def iter_shards(self) -> Iterator[int]:
        return iter(range(self.num_shards))


def parse_arrays(arrays: Any) -> dict[str, ArraySpec]:
    """Validate manifest["arrays"] and return the specs (KdpipeError on malformed entries)."""
    if not isinstance(arrays, dict) or not arrays:
        raise KdpipeError("cache manifest: 'arrays' must be a non-empty mapping name -> {shape, dtype, per}")
    out: dict[str, ArraySpec] = {}
    for name, spec in arrays.items():
        if not _NAME_RE.fullmatch(name):
            raise KdpipeError(
                f"cache manifest: array name {name!r} is not a safe file name (use [A-Za-z0-9_.-])"
            )
        if not isinstance(spec, dict):
            raise KdpipeError(f"cache manifest: arrays[{name!r}] must be a mapping with shape, dtype, per")
        shape, dtype, per = spec.get("shape"), spec.get("dtype"), spec.get("per", "view")
        if not isinstance(shape, list | tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise KdpipeError(f"cache manifest: arrays[{name!r}].shape must be a list of ints, got {shape!r}")
        if math.prod(shape) > MAX_ITEM or len(shape) > 8:
            raise KdpipeError(f"cache manifest: arrays[{name!r}].shape {shape!r} is too large")
        if not isinstance(dtype, str) or dtype not in STORAGE:
            raise KdpipeError(
                f"cache manifest: arrays[{name!r}].dtype {dtype!r} unknown; use one of {', '.join(STORAGE)}"
            )
        if not isinstance(per, str) or per not in ("view", "sample"):
            raise KdpipeError(f"cache manifest: arrays[{name!r}].per must be 'view' or 'sample', got {per!r}")
        out[name] = ArraySpec(name, tuple(int(d) for d in shape), str(dtype), str(per))
    return out


def _positive_int(manifest: dict, key: str, minimum: int, maximum: int = MAX_COUNT) -> int:
    v = manifest.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not minimum <= v <= maximum:
        raise KdpipeError(
            f"cache manifest: {key!r} must be an int >= {minimum} (at most {maximum:,}), got {v!r}"
        )
    return v


def layout_of(manifest: dict, num_shards: int | None = None) -> Layout:
    """The Layout of a (caller or stored) manifest; ``num_shards`` defaults to the stored count."""
    if num_shards is None:
        shards = manifest.get("shards")
        count = shards.get("count") if isinstance(shards, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_SHARDS:
            raise KdpipeError(f"cache manifest: 'shards.count' is {count!r}; the manifest is damaged")
        num_shards = count
    lay = Layout(
        num_samples=_positive_int(manifest, "num_samples", 1),
        num_views=_positive_int(manifest, "num_views", 1, MAX_VIEWS),
        chunk_size=_positive_int(manifest, "chunk_size", 1),
        num_shards=num_shards,
        arrays=parse_arrays(manifest.get("arrays")),
    )
    if lay.num_chunks > MAX_CHUNKS:
        raise KdpipeError(
            f"cache manifest: {lay.num_samples:,} samples in chunks of {lay.chunk_size} make "
            f"{lay.num_chunks:,} chunks (at most {MAX_CHUNKS:,}); use a larger chunk size"
        )
    return lay


def full_manifest(caller: dict, num_shards: int, kdpipe_version: str) -> dict:
    """The sealed manifest stored on disk: the caller's keys plus format, version, time and layout."""
    body = {k: v for k, v in caller.items() if k not in ADDED_KEYS}
    lay = layout_of(body, num_shards)
    body.update(
        format_version=FORMAT_VERSION,
        kdpipe_version=kdpipe_version,
        created=now_iso(),
        num_chunks=lay.num_chunks,
        shards={"count": num_shards, "chunks": [list(lay.shard_chunks(i)) for i in lay.iter_shards()]},
    )
    return seal(body)


def config_part(manifest: dict) -> dict:
    """The keys that define the cache's content (everything but added keys and the 'run' section)."""
    return {k: v for k, v in manifest.items() if k not in ADDED_KEYS and k != RUN_KEY}


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True) if v is not _MISSING else "(absent)"
    return s if len(s) <= 40 else s[:37] + "..."


_MISSING = object()


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Slash-separated key paths where ``a`` and ``b`` differ, with both values (a first)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            key = k if _NAME_RE.fullmatch(k) else json.dumps(k)  # odd keys quoted: the message stays one line
            out += diff_keys(a.get(k, _MISSING), b.get(k, _MISSING), f"{prefix}/{key}" if prefix else key)
        return out
    if a == b and type(a) is type(b):
        return []
    return [f"{prefix or '(root)'}: cache has {_short(a)}, this run has {_short(b)}"]


# ---------------------------------------------------------------------------------------- npy files
def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """NumPy .npy format 1.0 header: magic, version, uint16 LE length, dict literal padded to 64 bytes."""
    d = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    pre = 6 + 2 + 2
    total = -(-(pre + len(d) + 1) // NPY_ALIGN) * NPY_ALIGN
    d = d + " " * (total - pre - len(d) - 1) + "\n"
    if len(d) > 0xFFFF:
        raise KdpipeError(f"cache: .npy header too long for shape {shape}")
    return b"\x93NUMPY\x01\x00" + len(d).to_bytes(2, "little") + d.encode("latin1")


def parse_npy_header(head: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int] | None:
    """(dtype, shape, fortran_order, data offset) from the first bytes of a .npy file, or None."""
    if len(head) < 10 or head[:6] != b"\x93NUMPY" or head[6] not in (1, 2, 3):
        return None
    if head[6] == 1:
        n, start = int.from_bytes(head[8:10], "little"), 10
    else:
        n, start = int.from_bytes(head[8:12], "little"), 12
    if len(head) < start + n:
        return None
    try:
        d = ast.literal_eval(head[start : start + n].decode("latin1"))
        return np.dtype(d["descr"]), tuple(d["shape"]), bool(d["fortran_order"]), start + n
    except (ValueError, SyntaxError, KeyError, TypeError, UnicodeDecodeError):
        return None


# ------------------------------------------------------------------------------------------ journal
@dataclass
class Journal:
    """Parsed journal of one shard: ``done`` chunk -> {array: crc32} (last valid line wins)."""

    done: dict[int, dict[str, int]]
    bad_lines: list[int]  # 1-based numbers of complete lines whose seal does not match
    torn_tail: bool  # the file ends in a partial line (a crash mid-append)
    good_bytes: int  # length of the prefix ending with the last newline
    # chunk -> {array: global sample indices with a NaN/inf value} (only chunks that have any)
    nonfinite: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    error: str | None = None  # why the file could not be read (it then counts as empty)


def journal_line(chunk: int, rows: int, crcs: dict[str, int], nonfinite: dict | None = None) -> bytes:
    """The sealed line of a finished chunk; ``nonfinite`` (array -> samples) only when not empty."""
    body: dict[str, Any] = {"chunk": chunk, "rows": rows, "crc32": crcs}
    if nonfinite:
        body["nonfinite"] = nonfinite
    return canonical(seal(body)) + b"\n"


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def _valid_line(obj: Any) -> bool:
    """A sealed journal line with an int chunk, int crcs and (optionally) well-formed nonfinite lists."""
    if not (sealed_ok(obj) and isinstance(obj.get("chunk"), int) and isinstance(obj.get("crc32"), dict)):
        return False
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in obj["crc32"].values()):
        return False
    nf = obj.get("nonfinite", {})
    return isinstance(nf, dict) and all(_int_list(v) for v in nf.values())


def read_journal(path: Path) -> Journal:
    error = None
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError as e:  # a folder in its place, an I/O error: no chunk counts as done
        data, error = b"", f"{e.strerror or e}"
    cut = data.rfind(b"\n") + 1
    done: dict[int, dict[str, int]] = {}
    nonfinite: dict[int, dict[str, list[int]]] = {}
    bad: list[int] = []
    for k, line in enumerate(data[:cut].split(b"\n")[:-1], start=1):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if _valid_line(obj):
            done[obj["chunk"]] = obj["crc32"]
            if obj.get("nonfinite"):
                nonfinite[obj["chunk"]] = obj["nonfinite"]
            else:
                nonfinite.pop(obj["chunk"], None)
        else:
            bad.append(k)
    return Journal(done, bad, torn_tail=cut < len(data), good_bytes=cut, nonfinite=nonfinite, error=error)


def nonfinite_summary(per_chunk: list[dict[str, list[int]]], first: int = 10) -> dict[str, Any]:
    """Totals of per-chunk non-finite records: {"samples": count, "first": [...], "arrays": {name: count}}
    (empty dict when there are none)."""
    samples: set[int] = set()
    arrays: dict[str, int] = {}
    for rec in per_chunk:
        for name, idx in rec.items():
            samples.update(idx)
            arrays[name] = arrays.get(name, 0) + len(idx)
    if not samples:
        return {}
    return {"samples": len(samples), "first": sorted(samples)[:first], "arrays": dict(sorted(arrays.items()))}


def nonfinite_text(summary: dict[str, Any]) -> str:
    """One line: "NaN/inf in 3 sample(s) (first: 4, 9, 17) in logits (3), at.0 (2)"."""
    first = ", ".join(str(s) for s in summary["first"])
    more = ", ..." if summary["samples"] > len(summary["first"]) else ""
    where = ", ".join(f"{k} ({v})" for k, v in summary["arrays"].items())
    return f"NaN/inf in {summary['samples']} sample(s) (first: {first}{more}) in {where}"


def ranges(values: list[int] | set[int]) -> str:
    """Compact text of sorted ints: [0,1,2,5,7,8] -> "0-2, 5, 7-8"."""
    v = sorted(values)
    parts: list[str] = []
    k = 0
    while k < len(v):
        j = k
        while j + 1 < len(v) and v[j + 1] == v[j] + 1:
            j += 1
        parts.append(str(v[k]) if j == k else f"{v[k]}-{v[j]}")
        k = j + 1
    return ", ".join(parts)


def byte_view(a: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array as a flat memoryview (no copy)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).data


def view_bytes(arrays: dict[str, ArraySpec], num_views: int) -> dict[str, float]:
    """Stored bytes per (sample, view) of each array: a per-view row, or a per-sample row / views."""
    return {k: a.row_bytes(1) if a.per == "view" else a.row_bytes(num_views) / max(num_views, 1)
            for k, a in arrays.items()}  # fmt: skip


def bytes_per_view(arrays: dict[str, ArraySpec], num_views: int) -> float:
    """Stored bytes per (sample, view) of the whole cache (the sum of ``view_bytes``)."""
    return sum(view_bytes(arrays, num_views).values())


def projected_bytes(arrays: dict[str, ArraySpec], num_samples: int, num_views: int) -> int:
    """Data bytes of a cache with these arrays over ``num_samples`` samples x ``num_views`` views
    (headers, journal and manifest add a few KB)."""
    return num_samples * sum(a.row_bytes(num_views) for a in arrays.values())
