"""Cache reader: memory-mapped, read-only access to a (possibly sharded) cache as one logical array set."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.cache import format as fmt
from kdpipe.errors import KdpipeError
from kdpipe.ops import from_storage


# ------------------------------------------------------------------------------------ shard state
@dataclass
class ShardState:
    """What is on disk for one shard: folder, finished chunks, completeness."""

    index: int
    dir: Path
    chunks: range
    exists: bool
    done: set[int] = field(default_factory=set)
    complete: bool = False
    complete_doc: dict | None = None

    @property
    def missing(self) -> list[int]:
        return [c for c in self.chunks if c not in self.done]


def shard_state(root: Path, manifest: dict, lay: fmt.Layout, i: int) -> ShardState:
    d = root / fmt.SHARDS_DIR / fmt.shard_dirname(i, lay.num_shards)
    st = ShardState(index=i, dir=d, chunks=range(*lay.shard_chunks(i)), exists=d.is_dir())
    if not st.exists:
        return st
    j = fmt.read_journal(d / fmt.JOURNAL)
    st.done = {c for c in j.done if c in st.chunks}
    doc = fmt.read_json(d / fmt.COMPLETE)
    if (
        fmt.sealed_ok(doc)
        and doc.get("shard") == i
        and doc.get("of") == lay.num_shards
        and doc.get("manifest_seal") == manifest.get("seal")
    ):
        st.complete_doc = doc
        st.complete = not st.missing and all((d / f"{n}.npy").is_file() for n in lay.arrays)
    return st


def read_manifest(root: Path) -> tuple[dict, fmt.Layout]:
    """The stored manifest and its layout; KdpipeError when absent or damaged."""
    mpath = root / fmt.MANIFEST
    m = fmt.read_json(mpath)
    if m is None:
        what = "does not exist" if not root.exists() else "holds no kdpipe cache (no readable manifest.json)"
        raise KdpipeError(f"cache {root} {what}; give the folder written by `kdpipe cache-teacher --out`")
    if not fmt.sealed_ok(m):
        raise KdpipeError(f"cache manifest {mpath} is damaged (seal mismatch); rebuild the cache")
    if m.get("format_version") != fmt.FORMAT_VERSION:
        raise KdpipeError(
            f"cache {root} has format version {m.get('format_version')}; this kdpipe reads "
            f"{fmt.FORMAT_VERSION}: use the matching kdpipe version"
        )
    return m, fmt.layout_of(m)


def resume_hint(manifest: dict) -> str:
    cmd = (
        manifest.get(fmt.RUN_KEY, {}).get("command") if isinstance(manifest.get(fmt.RUN_KEY), dict) else None
    )
    return f"resume with: {cmd}" if cmd else "rerun the same `kdpipe cache-teacher` command to resume"


def missing_text(states: list[ShardState], n: int) -> str:
    parts = []
    for st in states:
        if st.complete:
            continue
        name = fmt.shard_dirname(st.index, n)
        if not st.exists:
            parts.append(f"shard {name} not started")
        elif st.missing:
            parts.append(f"shard {name} chunks {fmt.ranges(st.missing)} missing")
        else:
            parts.append(f"shard {name} written but not finished")
    return "; ".join(parts[:6]) + ("; ..." if len(parts) > 6 else "")


# ------------------------------------------------------------------------------------ sharded array
def _norm_first(key: Any, n: int) -> tuple[np.ndarray, tuple[int, ...] | None, bool]:
    """First-axis key -> (flat int64 indices, shape of the index (None for a scalar), is_slice)."""
    if isinstance(key, int | np.integer):
        k = int(key) + (n if key < 0 else 0)
        if not 0 <= k < n:
            raise IndexError(f"index {int(key)} out of range for {n} samples")
        return np.array([k], dtype=np.int64), None, False
    if isinstance(key, slice):
        return np.arange(*key.indices(n), dtype=np.int64), (len(range(*key.indices(n))),), True
    idx = np.asarray(key)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"boolean index of shape {idx.shape} does not match {n} samples")
        idx = np.flatnonzero(idx)
    if idx.dtype.kind not in "iu":
        raise IndexError(f"unsupported index of dtype {idx.dtype}; use ints, slices or int arrays")
    flat = idx.astype(np.int64).ravel()
    flat = np.where(flat < 0, flat + n, flat)
    if flat.size and (flat.min() < 0 or flat.max() >= n):
        raise IndexError(f"index out of range for {n} samples")
    return flat, idx.shape, False


class ShardedArray:
    """Read-only view of several shard memmaps as one array along the first (sample) axis.

    Supports ``shape``, ``dtype``, ``ndim``, ``len`` and ``[key]`` where the first-axis key is an int,
    slice, boolean mask or int array; further keys are passed through to each shard (an int array on
    another axis pairs element-wise with the first-axis array, as in NumPy). One read per shard touched.
    """

    def __init__(
        self, parts: list[np.ndarray | None], starts: list[int], shape: tuple[int, ...], dtype: np.dtype
    ):
        self._parts = parts
        self._starts = np.asarray(starts, dtype=np.int64)  # first sample of each shard
        self.shape = shape
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out.astype(dtype) if dtype is not None else out

    def _part(self, s: int) -> np.ndarray:
        p = self._parts[s]
        if p is None:
            raise KdpipeError(
                f"cache shard {s} has not been written; finish the cache before reading these rows"
            )
        return p

    def __getitem__(self, key: Any) -> np.ndarray:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if first is Ellipsis:
            first, rest = slice(None), (Ellipsis,) + tuple(rest)
        n = self.shape[0]
        idx, idx_shape, is_slice = _norm_first(first, n)
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        if idx_shape is None:  # one sample: plain indexing of its shard
            s = int(shard[0])
            return self._part(s)[(int(idx[0] - self._starts[s]),) + tuple(rest)]
        step = first.step if is_slice and first.step is not None else 1
        if is_slice and step > 0 and idx.size and shard[0] == shard[-1]:  # inside one shard: a view
            s = int(shard[0])
            lo = int(idx[0] - self._starts[s])
            return self._part(s)[(slice(lo, int(idx[-1] - self._starts[s]) + 1, step),) + tuple(rest)]
        # paired advanced indices on later axes follow the first-axis selection
        adv = [
            k
            for k, r in enumerate(rest)
            if not isinstance(r, slice | int | np.integer) and r is not Ellipsis and r is not None
        ]
        try:
            rest_arrays = {k: np.broadcast_to(np.asarray(rest[k]), idx_shape).ravel() for k in adv}
        except ValueError as e:
            raise IndexError(f"index arrays on later axes must broadcast to the first-axis index: {e}") from e
        pieces: list[tuple[np.ndarray, np.ndarray]] = []
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            loc = idx[sel] - self._starts[s]
            order = np.argsort(loc, kind="stable")  # ascending reads: sequential I/O
            sub = list(rest)
            for k in adv:
                sub[k] = rest_arrays[k][sel][order]
            got = self._part(int(s))[(loc[order],) + tuple(sub)]
            pieces.append((sel[order], got))
        if not pieces:
            probe = np.zeros((1,) + self.shape[1:], dtype=self.dtype)
            sub = [np.zeros(1, np.int64) if k in adv else r for k, r in enumerate(rest)]
            empty = probe[(np.zeros(1, np.int64),) + tuple(sub)][:0]
            return empty.reshape(idx_shape + empty.shape[1:])
        out = np.empty((idx.size,) + pieces[0][1].shape[1:], dtype=self.dtype)
        for sel, got in pieces:
            out[sel] = got
        return out.reshape(idx_shape + out.shape[1:])

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self._parts)})"


ArrayLike = np.ndarray | ShardedArray


def _madvise(mm: np.ndarray, advice: int) -> None:
    """Apply ``advice`` to the mapping behind the memmap ``mm`` (a no-op for other arrays)."""
    handle = getattr(mm, "_mmap", None)
    if handle is not None and hasattr(handle, "madvise"):
        handle.madvise(advice)


# ---------------------------------------------------------------------------------------- the cache
class Cache:
    """A cache opened for reading; build it with ``kdpipe.cache.open``.

    Arrays are indexed [sample, view, ...] (per-view) or [sample, ...] (per-sample) in their raw storage
    dtype (bfloat16 as uint16 bits); ``gather`` decodes to float32.
    """

    def __init__(self, path: str | os.PathLike, require_complete: bool = True):
        self.path = Path(path)
        self.manifest, self.layout = read_manifest(self.path)
        n = self.layout.num_shards
        self.shards = [shard_state(self.path, self.manifest, self.layout, i) for i in range(n)]
        if require_complete and not self.complete:
            raise KdpipeError(
                f"cache {self.path} is incomplete ({missing_text(self.shards, n)}); "
                f"{resume_hint(self.manifest)}"
            )
        self._arrays: dict[str, ArrayLike] = {}
        self._labels: np.ndarray | None = None
        self._advice: int | None = None

    # ------------------------------------------------------------------------------- description
    @property
    def complete(self) -> bool:
        """True iff every shard of the layout is finished (COMPLETE.json valid, all chunks journaled)."""
        return all(s.complete for s in self.shards)

    def nonfinite(self) -> dict[str, Any]:
        """NaN/inf teacher outputs accepted at completion (``--allow-nonfinite``), over all shards:
        {"samples": count, "first": [...], "arrays": {name: count}}; {} when there are none."""
        found = [s.complete_doc.get("nonfinite") for s in self.shards if s.complete_doc]
        docs: list[dict[str, Any]] = [d for d in found if isinstance(d, dict) and d.get("samples")]
        if not docs:
            return {}
        arrays: dict[str, int] = {}
        for d in docs:
            for k, v in d.get("arrays", {}).items():
                arrays[k] = arrays.get(k, 0) + int(v)
        first = sorted(x for d in docs for x in d.get("first", []))[:10]
        return {
            "samples": sum([int(d["samples"]) for d in docs]),
            "first": first,
            "arrays": dict(sorted(arrays.items())),
        }

    def missing(self) -> dict[int, list[int]]:
        """Shard index -> chunk indices not yet written (only unfinished shards)."""
        return {s.index: s.missing for s in self.shards if not s.complete and s.missing}

    @property
    def arrays(self) -> dict[str, fmt.ArraySpec]:
        return self.layout.arrays

    @property
    def taps(self) -> list[str]:
        """Tap names in index order (manifest["taps"][i]["name"])."""
        taps = self.manifest.get("taps")
        return (
            [str(t.get("name")) if isinstance(t, dict) else str(t) for t in taps or []]
            if isinstance(taps, list)
            else []
        )

    @property
    def num_views(self) -> int:
        return self.layout.num_views

    def __len__(self) -> int:
        return self.layout.num_samples

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, samples={len(self)}, views={self.num_views}, done={self.complete})"

    # ----------------------------------------------------------------------------------- arrays
    def _open_part(self, name: str, i: int) -> np.ndarray | None:
        st = self.shards[i]
        expected_shape = self.layout.file_shape(name, i)
        dtype = self.layout.arrays[name].np_dtype
        if expected_shape[0] == 0:
            return np.empty(expected_shape, dtype=dtype)
        fpath = st.dir / f"{name}.npy"
        if not fpath.is_file():
            if st.complete:
                raise KdpipeError(f"cache file {fpath} is missing; run `kdpipe cache verify {self.path}`")
            return None
        header = fmt.npy_header(dtype, expected_shape)
        if fpath.stat().st_size < len(header) + self.layout.data_bytes(name, i):
            raise KdpipeError(f"cache file {fpath} is truncated; run `kdpipe cache verify {self.path}`")
        with fpath.open("rb") as f:
            if f.read(len(header)) != header:  # every header byte is implied by the manifest
                raise KdpipeError(
                    f"cache file {fpath} has a damaged .npy header; run `kdpipe cache verify {self.path}`"
                )
        try:
            mm = np.load(fpath, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise KdpipeError(
                f"cache file {fpath} is not a valid .npy ({e}); run `kdpipe cache verify`"
            ) from e
        if self._advice is not None:
            _madvise(mm, self._advice)
        if mm.shape != expected_shape or mm.dtype != dtype:
            raise KdpipeError(
                f"cache file {fpath} holds {mm.dtype}{mm.shape}, manifest says {dtype}{expected_shape}; "
                f"run `kdpipe cache verify {self.path}`"
            )
        return mm

    def advise_random(self) -> None:
        """Tell the kernel that reads will be scattered (``madvise(MADV_RANDOM)``): a page fault then
        reads its page, not the default readahead window around it. For batches of random
        (sample, view) rows from a cache larger than the page cache (docs/benchmarks.md)."""
        import mmap

        self._advice = getattr(mmap, "MADV_RANDOM", None)
        if self._advice is None:
            return
        for arr in self._arrays.values():
            for part in arr._parts if isinstance(arr, ShardedArray) else [arr]:
                if part is not None:
                    _madvise(part, self._advice)

    def read_ahead(self, names: list[str], chunks: list[int]) -> None:
        """Ask the kernel to read chunks ``chunks`` of arrays ``names`` into the page cache now
        (``posix_fadvise(WILLNEED)`` on each chunk's byte range: one sequential read per chunk and
        file, started without waiting for it). A hint: it never fails a run."""
        advice = getattr(os, "POSIX_FADV_WILLNEED", None)
        if advice is None:
            return
        lay = self.layout
        by_shard: dict[int, list[int]] = {}
        for c in chunks:
            by_shard.setdefault(lay.shard_of_chunk(c), []).append(c)
        for name in names:
            spec = lay.arrays[name]
            row = spec.row_bytes(lay.num_views)
            for i, cs in by_shard.items():
                first = lay.shard_samples(i)[0]
                head = len(fmt.npy_header(spec.np_dtype, lay.file_shape(name, i)))
                try:
                    fd = os.open(self.shards[i].dir / f"{name}.npy", os.O_RDONLY)
                except OSError:
                    continue
                try:
                    for c in cs:
                        s0, s1 = lay.chunk_range(c)
                        os.posix_fadvise(fd, head + (s0 - first) * row, (s1 - s0) * row, advice)
                except OSError:
                    pass
                finally:
                    os.close(fd)

    def array(self, name: str) -> ArrayLike:
        """Stored array ``name`` over all samples: the np.memmap itself (one shard) or a ShardedArray."""
        if name not in self.layout.arrays:
            raise KdpipeError(
                f"cache {self.path} has no array {name!r}; stored: {', '.join(self.layout.arrays)}"
            )
        if name not in self._arrays:
            n = self.layout.num_shards
            parts = [self._open_part(name, i) for i in range(n)]
            if n == 1 and parts[0] is not None:
                self._arrays[name] = parts[0]
            else:
                starts = [self.layout.shard_samples(i)[0] for i in range(n)]
                shape = (self.layout.num_samples,) + self.layout.arrays[name].row_shape(self.num_views)
                self._arrays[name] = ShardedArray(parts, starts, shape, self.layout.arrays[name].np_dtype)
        return self._arrays[name]

    def _tap_index(self, kind: str, tap: int | str | None, candidates: list[int]) -> int:
        names = self.taps
        if tap is None:
            if len(candidates) == 1:
                return candidates[0]
            listed = ", ".join(names[i] if i < len(names) else str(i) for i in candidates)
            raise KdpipeError(
                f"cache {self.path} stores '{kind}' targets for several taps ({listed}); name one"
            )
        if isinstance(tap, str) and not tap.lstrip("-").isdigit():
            if tap not in names:
                raise KdpipeError(
                    f"cache {self.path} has no tap {tap!r}; taps: {', '.join(names) or '(none)'}"
                )
            return names.index(tap)
        k = int(tap)
        return k + len(names) if k < 0 else k

    def targets(self, kind: str, tap: int | str | None = None, variant: str | None = None) -> ArrayLike:
        """Targets of ``kind`` ("at", "dct", "pooled", "logits" or a stored array name) [sample, view, ...].

        ``tap``: name or index in ``taps`` (optional when only one is stored); ``variant`` for "dct"
        (optional when only one is stored). Raw storage dtype, memory-mapped.
        """
        arrays = self.layout.arrays
        if kind in ("at", "pooled", "dct"):
            prefix = kind + "."
            stored = [a[len(prefix) :] for a in arrays if a.startswith(prefix)]
            if kind == "dct":
                variants = sorted({s.rsplit(".", 1)[0] for s in stored})
                if variant is None:
                    if len(variants) != 1:
                        raise KdpipeError(
                            f"cache {self.path} stores DCT variants {', '.join(variants) or '(none)'}; "
                            "choose one"
                        )
                    variant = variants[0]
                if variant not in variants:
                    raise KdpipeError(
                        f"cache {self.path} has no DCT variant {variant!r}; "
                        f"stored: {', '.join(variants) or '(none)'}"
                    )
                prefix += variant + "."
                stored = [s.rsplit(".", 1)[1] for s in stored if s.rsplit(".", 1)[0] == variant]
            idx = sorted(int(s) for s in stored if s.isdigit())
            if not idx:
                raise KdpipeError(
                    f"cache {self.path} stores no '{kind}' targets; stored: {', '.join(arrays)}"
                )
            i = self._tap_index(kind, tap, idx)
            if i not in idx:
                label = self.taps[i] if 0 <= i < len(self.taps) else str(i)
                raise KdpipeError(f"cache {self.path} stores no '{kind}' targets for tap {label}")
            return self.array(f"{prefix}{i}")
        if tap is not None or variant is not None:
            raise KdpipeError(f"targets({kind!r}): tap/variant only apply to 'at', 'pooled' and 'dct'")
        return self.array(kind)

    def gather(self, name: str, samples: np.ndarray, views: np.ndarray | None = None) -> np.ndarray:
        """Rows (samples[b], views[b]) of array ``name``: float32 (B, ...) for float arrays (decoded from
        float16/bfloat16), the stored int dtype for int arrays. ``views`` is ignored for per-sample arrays.
        """
        spec = self.layout.arrays.get(name)
        if spec is None:
            raise KdpipeError(
                f"cache {self.path} has no array {name!r}; stored: {', '.join(self.layout.arrays)}"
            )
        arr = self.array(name)
        s = np.asarray(samples, dtype=np.int64)
        if spec.per == "view":
            if views is None:
                raise ValueError(f"gather({name!r}): per-view array needs views")
            v = np.broadcast_to(np.asarray(views, dtype=np.int64), s.shape)
            if v.size and (v.min() < 0 or v.max() >= self.num_views):
                raise IndexError(f"gather({name!r}): view index out of range 0..{self.num_views - 1}")
            if isinstance(arr, np.ndarray):
                order = np.argsort(s, kind="stable")
                raw = np.empty((s.size,) + arr.shape[2:], dtype=arr.dtype)
                raw[order] = arr[s[order], v[order]]
            else:
                raw = arr[s, v]
        else:
            raw = np.asarray(arr[s])
        if spec.dtype in fmt.FLOAT_KINDS:
            return np.ascontiguousarray(from_storage(raw, spec.dtype), dtype=np.float32)
        return np.asarray(raw)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 labels, read into memory."""
        if self._labels is None:
            self._labels = np.asarray(self.array("labels")[:], dtype=np.int64)
        return self._labels

    @property
    def view_params(self) -> ArrayLike:
        """(N, V, 5) int32 view parameters (y0, x0, h, w, flip), memory-mapped."""
        return self.array("view_params")

    def verify(self) -> list[str]:
        """Problems found by ``kdpipe.cache.verify`` (empty when the cache is intact)."""
        from kdpipe.cache.verify import verify

        return verify(self.path)


def open(path: str | os.PathLike, require_complete: bool = True) -> Cache:  # noqa: A001
    """Open the cache at ``path`` for reading; KdpipeError if missing, damaged or (by default) incomplete."""
    return Cache(path, require_complete=require_complete)


def _disk_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def info(path: str | os.PathLike, project: tuple[int, int] | None = None) -> dict:
    """Summary of a cache (complete or not): sizes, bytes per view, taps, arrays, completeness, shard
    progress; with ``project=(images, views)`` also the data bytes of such a cache at that size."""
    c = Cache(path, require_complete=False)
    lay, n, V = c.layout, c.layout.num_samples, c.layout.num_views
    arrays = {
        name: {
            "shape": [n, *spec.row_shape(V)],
            "dtype": spec.dtype,
            "per": spec.per,
            "bytes": n * spec.row_bytes(V),
        }
        for name, spec in lay.arrays.items()
    }
    done = sum(len(s.done) for s in c.shards)
    return {
        "path": str(c.path),
        "format_version": c.manifest.get("format_version"),
        "kdpipe_version": c.manifest.get("kdpipe_version"),
        "created": c.manifest.get("created"),
        "num_samples": n,
        "num_views": V,
        "chunk_size": lay.chunk_size,
        "num_chunks": lay.num_chunks,
        "taps": c.taps,
        "arrays": arrays,
        "bytes_on_disk": _disk_bytes(c.path),
        "bytes_per_view": round(fmt.bytes_per_view(lay.arrays, V), 1),
        "complete": c.complete,
        **({"nonfinite": bad} if (bad := c.nonfinite()) else {}),
        "shards": {
            "count": lay.num_shards,
            "complete": sum(s.complete for s in c.shards),
            "chunks_done": done,
            "chunks_total": lay.num_chunks,
            "missing": missing_text(c.shards, lay.num_shards),
        },
        **{k: c.manifest[k] for k in ("teacher", "dataset", "views") if k in c.manifest},
        **(
            {
                "projected": {
                    "images": project[0],
                    "views": project[1],
                    "bytes": fmt.projected_bytes(lay.arrays, *project),
                }
            }
            if project
            else {}
        ),
    }
