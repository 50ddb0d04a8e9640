"""Cache writer: one process writes one shard, chunk by chunk, crash-safe and resumable.

Data go to preallocated .npy files through ``os.pwrite`` (never a writable memmap: a full disk would
kill the process with SIGBUS); each chunk is fsynced and then recorded by one sealed journal line.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe import __version__
from kdpipe.cache import format as fmt
from kdpipe.errors import KdpipeError
from kdpipe.ops import to_storage

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_fdatasync = getattr(os, "fdatasync", os.fsync)


def _pwrite_all(fd: int, buf: bytes | np.ndarray, offset: int) -> None:
    view = fmt.byte_view(buf) if isinstance(buf, np.ndarray) else memoryview(buf)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _disk_error(path: Path, need: int, e: OSError) -> KdpipeError:
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        free = -1
    return KdpipeError(
        f"not enough disk space for the cache at {path}: needs {need:,} more bytes, {free:,} free "
        f"({e.strerror or e}); free some space or choose another --out folder, then rerun the same command"
    )


class _Busy(Exception):
    """The shard's lock is held by another process (``holder``: what it wrote in the lock file)."""

    def __init__(self, holder: str) -> None:
        self.holder = holder


def _busy_error(shard_dir: Path, holder: str) -> KdpipeError:
    return KdpipeError(
        f"cache shard {shard_dir} is being written by another process ({holder or 'unknown'}); "
        "wait for it to finish or stop it, then rerun"
    )


def _lock(shard_dir: Path) -> int | None:
    """An exclusive advisory lock on the shard (released by the kernel when the process dies); None on
    a filesystem without flock. Raises _Busy when another process holds it."""
    import fcntl

    fd = os.open(shard_dir / fmt.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise _Busy(holder) from None
    except OSError:  # filesystem without flock support: proceed unlocked
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
    return fd


class CacheWriter:
    """Writer of shard ``shard = (i, n)`` of the cache at ``path``; build it with ``create_or_resume``.

    Chunk indices are global (0 .. num_chunks-1); this shard owns ``chunks`` (a range).
    """

    def __init__(self, path: Path, manifest: dict, shard: tuple[int, int]):
        self.path = path
        self.manifest = manifest
        self.shard = shard
        self.layout = fmt.layout_of(manifest)
        i, n = shard
        self.shard_dir = path / fmt.SHARDS_DIR / fmt.shard_dirname(i, n)
        self.chunks = range(*self.layout.shard_chunks(i))
        self.samples = self.layout.shard_samples(i)
        self._mutex = threading.Lock()
        self._fds: dict[str, int] = {}
        self._offsets: dict[str, int] = {}
        self._journal_fd = -1
        self._lock_fd: int | None = None
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        fmt.fsync_dir(self.shard_dir.parent)
        # read_only: another process holds the lock of a shard that is complete (sealed for this
        # manifest, every chunk journaled), which is never written again; this writer only reads it
        self.read_only, holder = False, ""
        try:
            self._lock_fd = _lock(self.shard_dir)
        except _Busy as busy:
            self.read_only, holder = True, busy.holder
        try:
            self._open_journal()
            if self.read_only and not self._sealed_and_whole():
                raise _busy_error(self.shard_dir, holder)
            self._open_files()
        except BaseException:
            self.close()
            raise

    def _sealed_and_whole(self) -> bool:
        doc = fmt.read_json(self.shard_dir / fmt.COMPLETE)
        return (
            fmt.sealed_ok(doc)
            and doc.get("manifest_seal") == self.manifest.get("seal")
            and all(c in self._done for c in self.chunks)
        )

    # ------------------------------------------------------------------------------------ opening
    def _open_journal(self) -> None:
        jpath = self.shard_dir / fmt.JOURNAL
        j = fmt.read_journal(jpath)
        if self.read_only:  # no journal: nothing is complete, and the caller says the shard is busy
            self._journal_fd = os.open(jpath, os.O_RDONLY) if jpath.exists() else -1
        else:
            self._journal_fd = os.open(jpath, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        # a crash mid-append: drop the partial line so the next line starts clean
        if j.torn_tail and not self.read_only:
            os.ftruncate(self._journal_fd, j.good_bytes)
            os.fsync(self._journal_fd)
        self._done = {c: crc for c, crc in j.done.items() if c in self.chunks}
        self._nonfinite = {c: nf for c, nf in j.nonfinite.items() if c in self._done}

    def _open_files(self) -> None:
        lay = self.layout
        i = self.shard[0]
        plans: list[tuple[str, Path, bytes, int, bool]] = []
        need = 0
        for name in lay.arrays:
            fpath = self.shard_dir / f"{name}.npy"
            spec = lay.arrays[name]
            header = fmt.npy_header(spec.np_dtype, lay.file_shape(name, i))
            total = len(header) + lay.data_bytes(name, i)
            exists = fpath.exists()
            if exists:
                with open(fpath, "rb") as f:
                    head = f.read(len(header))
                if head != header:
                    raise KdpipeError(
                        f"cache file {fpath} has a damaged or foreign header; delete the folder "
                        f"{self.shard_dir} to redo this shard"
                    )
                need += max(0, total - os.stat(fpath).st_blocks * 512)
            else:
                if self._done:
                    raise KdpipeError(
                        f"cache file {fpath} is missing although the journal lists finished chunks; "
                        f"delete the folder {self.shard_dir} to redo this shard"
                    )
                need += total
            plans.append((name, fpath, header, total, exists))
        try:
            free = shutil.disk_usage(self.shard_dir).free
        except OSError:
            free = None
        if free is not None and need > free and not self.read_only:
            raise KdpipeError(
                f"not enough disk space for the cache at {self.path}: shard {self.shard[0]}/{self.shard[1]} "
                f"needs {need:,} more bytes, {free:,} free; free some space or choose another --out folder"
            )
        created: list[Path] = []
        try:
            for name, fpath, header, total, exists in plans:
                if self.read_only:
                    self._fds[name] = os.open(fpath, os.O_RDONLY)
                    self._offsets[name] = len(header)
                    continue
                fd = os.open(fpath, os.O_RDWR | os.O_CREAT, 0o644)
                self._fds[name] = fd
                if not exists:
                    created.append(fpath)
                    _pwrite_all(fd, header, 0)
                # a file already reserved in full (a resumed or complete shard) is left untouched
                if not exists or os.fstat(fd).st_blocks * 512 < total:
                    self._preallocate(fd, total)
                    os.fsync(fd)
                self._offsets[name] = len(header)
        except OSError as e:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            for fpath in created:  # give the space back; nothing half-made is left to look usable
                fpath.unlink(missing_ok=True)
            if e.errno in _NO_SPACE:
                raise _disk_error(self.path, need, e) from None
            raise
        fmt.fsync_dir(self.shard_dir)

    @staticmethod
    def _preallocate(fd: int, total: int) -> None:
        if total == 0:
            return
        fallocate = getattr(os, "posix_fallocate", None)
        if fallocate is not None:
            try:
                fallocate(fd, 0, total)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
        if os.fstat(fd).st_size < total:  # no fallocate here: sparse extension (free space was checked)
            os.ftruncate(fd, total)

    # ------------------------------------------------------------------------------------- writing
    def pending_chunks(self) -> list[int]:
        """Global indices of this shard's chunks not yet written (in increasing order)."""
        with self._mutex:
            return [c for c in self.chunks if c not in self._done]

    def chunk_range(self, c: int) -> tuple[int, int]:
        """Global sample range [start, stop) of chunk ``c``."""
        return self.layout.chunk_range(c)

    @property
    def complete(self) -> bool:
        return (self.shard_dir / fmt.COMPLETE).exists()

    def _storage(self, name: str, arr: Any, rows: int) -> np.ndarray:
        spec = self.layout.arrays[name]
        expected = (rows,) + spec.row_shape(self.layout.num_views)
        a = np.asarray(arr)
        if a.shape != expected:
            raise ValueError(f"write_chunk: array {name!r} has shape {a.shape}, expected {expected}")
        target = spec.np_dtype
        if a.dtype.kind == target.kind and a.dtype.itemsize == target.itemsize:
            pass  # byte order, if foreign, is fixed by ascontiguousarray below
        elif spec.dtype in fmt.FLOAT_KINDS and a.dtype.kind == "f":
            a = to_storage(a.astype(np.float32, copy=False), spec.dtype)
        elif spec.dtype not in fmt.FLOAT_KINDS and a.dtype.kind in "iu":
            info = np.iinfo(target)
            if a.size and (a.min() < info.min or a.max() > info.max):
                raise ValueError(f"write_chunk: array {name!r} has values outside {spec.dtype}")
        else:
            raise TypeError(f"write_chunk: array {name!r} has dtype {a.dtype}, expected storage {spec.dtype}")
        return np.ascontiguousarray(a, dtype=target)

    def write_chunk(
        self, c: int, arrays: dict[str, np.ndarray], nonfinite: dict[str, list[int]] | None = None
    ) -> dict[str, int]:
        """Write chunk ``c``: ``arrays[name]`` is (stop-start[, V], *shape) in the storage dtype.

        float arrays are converted with ``kdpipe.ops.to_storage`` when given in another float dtype
        (OverflowError on values out of range). Data are fsynced, then the chunk is journaled, with
        ``nonfinite`` (array -> global sample indices holding NaN/inf, as found by the caller) when
        given. Returns the crc32 of each array's bytes.
        """
        if self.read_only:
            raise KdpipeError(
                f"cache shard {self.shard_dir} is complete and open read-only; nothing to write"
            )
        if c not in self.chunks:
            raise ValueError(f"write_chunk: chunk {c} is not in shard {self.shard} (chunks {self.chunks})")
        if set(arrays) != set(self.layout.arrays):
            missing = sorted(set(self.layout.arrays) - set(arrays))
            extra = sorted(set(arrays) - set(self.layout.arrays))
            raise ValueError(f"write_chunk: arrays missing {missing}, unexpected {extra}")
        s0, s1 = self.chunk_range(c)
        row0 = s0 - self.samples[0]
        crcs: dict[str, int] = {}
        try:
            for name, arr in arrays.items():
                a = self._storage(name, arr, s1 - s0)
                spec = self.layout.arrays[name]
                off = self._offsets[name] + row0 * spec.row_bytes(self.layout.num_views)
                _pwrite_all(self._fds[name], a, off)
                crcs[name] = zlib.crc32(fmt.byte_view(a))
            for name in arrays:
                _fdatasync(self._fds[name])
            nf = {k: sorted(int(x) for x in v) for k, v in sorted((nonfinite or {}).items()) if len(v)}
            line = fmt.journal_line(c, s1 - s0, crcs, nf)
            with self._mutex:
                _pwrite_all_append(self._journal_fd, line)
                os.fsync(self._journal_fd)
                self._done[c] = crcs
                if nf:
                    self._nonfinite[c] = nf
        except OSError as e:
            if e.errno in _NO_SPACE:
                raise _disk_error(self.path, 0, e) from None
            raise
        return crcs

    def nonfinite(self) -> dict[str, Any]:
        """Summary of the NaN/inf samples journaled in this shard (``fmt.nonfinite_summary``; {} if none)."""
        with self._mutex:
            return fmt.nonfinite_summary([self._nonfinite[c] for c in sorted(self._nonfinite)])

    def finish(self, allow_nonfinite: bool = False) -> None:
        """Mark the shard complete (atomic COMPLETE.json); KdpipeError when chunks are still missing, or
        when chunks hold NaN/inf values and ``allow_nonfinite`` is False (then recorded in the doc)."""
        pending = self.pending_chunks()
        if pending:
            raise KdpipeError(
                f"cache shard {self.shard_dir} cannot be finished: {len(pending)} chunk(s) not written "
                f"({fmt.ranges(pending)}); rerun the same command to resume"
            )
        bad = self.nonfinite()
        if bad and not allow_nonfinite:
            raise KdpipeError(
                f"cache shard {self.shard_dir} not marked complete: {fmt.nonfinite_text(bad)}; "
                "finish(allow_nonfinite=True) accepts them"
            )
        cpath = self.shard_dir / fmt.COMPLETE
        if not fmt.sealed_ok(fmt.read_json(cpath)):
            i, n = self.shard
            missing = [a for a in self.layout.arrays if any(a not in self._done[c] for c in self.chunks)]
            if missing:
                raise KdpipeError(
                    f"cache shard {self.shard_dir}: the journal records no checksum of {missing[0]!r}; "
                    f"it is damaged: delete the folder {self.shard_dir} to redo this shard"
                )
            arrays = {
                name: {
                    "file": f"{name}.npy",
                    "bytes": os.fstat(self._fds[name]).st_size,
                    "chunk_crc32": [self._done[c][name] for c in self.chunks],
                }
                for name in self.layout.arrays
            }
            doc = {
                "shard": i,
                "of": n,
                "chunks": [self.chunks.start, self.chunks.stop],
                "samples": list(self.samples),
                "manifest_seal": self.manifest["seal"],
                "kdpipe_version": __version__,
                "finished": fmt.now_iso(),
                "arrays": arrays,
                **({"nonfinite": bad} if bad else {}),
            }
            try:
                fmt.write_json_atomic(cpath, fmt.seal(doc), indent=None)
            except OSError as e:
                if e.errno in _NO_SPACE:
                    raise _disk_error(self.path, 0, e) from None
                raise KdpipeError(
                    f"cannot write {cpath} ({e.strerror or e}); remove what is in its place and rerun"
                ) from e
        self.close()

    def close(self) -> None:
        """Release files and the shard lock (the writer can no longer write)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pwrite_all_append(fd: int, data: bytes) -> None:
    # O_APPEND: one write() of a short line lands whole at the end (or fails / is torn on a crash)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def create_or_resume(path: str | os.PathLike, manifest: dict, shard: tuple[int, int] = (0, 1)) -> CacheWriter:
    """Open shard ``shard = (i, n)`` of the cache at ``path`` for writing, creating the cache if needed.

    ``manifest`` needs num_samples, num_views, chunk_size and arrays {name: {shape, dtype, per}};
    other sections (teacher, taps, dataset, views, ...) are stored and must match an existing cache;
    the top-level "run" section is free-form and never compared. Raises KdpipeError when ``path``
    holds a different cache, another shard count, or is not a cache, or when the disk is too small.
    """
    root = Path(path)
    i, n = shard
    if not (isinstance(n, int) and isinstance(i, int) and n >= 1 and 0 <= i < n):
        raise KdpipeError(f"cache shard {i}/{n} is invalid: need 0 <= index < count (e.g. --shard 0/4)")
    caller = fmt.normalise(manifest)
    if not isinstance(caller, dict):
        raise KdpipeError("cache manifest must be a mapping")
    fmt.layout_of(caller, n)  # validates
    if root.exists() and not root.is_dir():
        raise KdpipeError(f"--out {root} is a file, not a folder; choose a folder for the cache")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (
        OSError
    ) as e:  # an existing folder that cannot be written fails below, through the CLI's OSError line
        raise KdpipeError(
            f"cannot write the cache folder --out {root} ({e.strerror or e}); choose a folder you can "
            "write to"
        ) from None
    mpath = root / fmt.MANIFEST
    if not mpath.exists():
        # another worker of the same array job may create the manifest (then shards/) meanwhile
        others = [
            e for e in os.listdir(root) if not (e.startswith(f".{fmt.MANIFEST}.") and e.endswith(".tmp"))
        ]
        if not others:
            fmt.write_json_atomic(mpath, fmt.full_manifest(caller, n, __version__), exclusive=True)
        elif not mpath.exists():
            raise KdpipeError(
                f"--out {root} is not empty and holds no kdpipe cache ({', '.join(sorted(others)[:3])}...); "
                "choose a new or empty folder"
            )
    stored = fmt.read_json(mpath)
    if not fmt.sealed_ok(stored):
        raise KdpipeError(
            f"cache manifest {mpath} is damaged (seal mismatch); delete the folder {root} to redo it"
        )
    if stored.get("format_version") != fmt.FORMAT_VERSION:
        raise KdpipeError(
            f"cache {root} has format version {stored.get('format_version')}, this kdpipe writes "
            f"{fmt.FORMAT_VERSION}; use another --out folder or the kdpipe version that made it"
        )
    diffs = fmt.diff_keys(fmt.config_part(stored), fmt.config_part(caller))
    if diffs:
        raise KdpipeError(
            f"--out {root} holds a cache made with another teacher/configuration ({'; '.join(diffs[:4])}"
            f"{'; ...' if len(diffs) > 4 else ''}); use another --out folder or delete this one"
        )
    have = fmt.layout_of(stored).num_shards  # validated: a damaged count is one line, not a TypeError
    if have != n:
        raise KdpipeError(
            f"cache {root} is being written in {have} shard(s), this run asks for shard {i}/{n}; "
            f"use --shard k/{have} (or a new --out folder for another split)"
        )
    try:
        return CacheWriter(root, stored, (i, n))
    except OSError as e:  # a folder where a file should be, a file that cannot be opened, ...
        raise KdpipeError(
            f"cache {root}: cannot open shard {i}/{n} for writing ({e.strerror or e}: {e.filename}); "
            "delete that shard's folder to redo it, or choose another --out folder"
        ) from e
