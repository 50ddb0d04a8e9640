"""Integrity check of a cache (every byte covered by a checksum) and merging of shards into one."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kdpipe.cache import format as fmt
from kdpipe.cache.reader import Cache, ShardState, read_manifest, shard_state
from kdpipe.cache.writer import create_or_resume
from kdpipe.errors import KdpipeError
from kdpipe.ops import allowed_cpus

_READ_BLOCK = 16 << 20


def _crc_region(fd: int, offset: int, size: int) -> tuple[int, int]:
    """(crc32, bytes actually read) of ``size`` bytes at ``offset``."""
    crc, got = 0, 0
    while got < size:
        buf = os.pread(fd, min(_READ_BLOCK, size - got), offset + got)
        if not buf:
            break
        crc = zlib.crc32(buf, crc)
        got += len(buf)
    return crc, got


def verify(
    path: str | os.PathLike,
    arrays: Iterable[str] | None = None,
    threads: int | None = None,
    part: tuple[int, int] = (0, 1),
) -> list[str]:
    """Every problem found in the cache at ``path`` (empty list: intact and complete).

    Checks the manifest seal, each shard's journal lines and COMPLETE.json seals, each .npy header
    byte for byte against the manifest, file sizes, and the crc32 of every written chunk of every array
    against the journal (so any flipped byte is found); reports missing files and unfinished shards.
    ``arrays``: check only these stored arrays (default: all). ``threads``: files hashed in parallel
    (zlib's crc32 releases the GIL; default: the CPUs this process may use, at most 8).
    ``part=(k, n)``: hash only every n-th file starting at k (DDP ranks split the work).
    """
    root = Path(path)
    try:
        manifest, lay = read_manifest(root)
    except KdpipeError as e:
        return [str(e)]
    names = list(lay.arrays) if arrays is None else [a for a in arrays if a in lay.arrays]
    problems: list[str] = []
    jobs: list[tuple[str, Path, int, dict[int, dict[str, int]], str]] = []
    for i in range(lay.num_shards):
        st = shard_state(root, manifest, lay, i)
        sname = f"shard {fmt.shard_dirname(i, lay.num_shards)}"
        if not st.exists:
            problems.append(f"{sname}: not started (folder {st.dir} missing)")
            continue
        crcs = _shard_records(st, sname, problems)
        for name in names:
            jobs.append((sname, st.dir / f"{name}.npy", i, crcs, name))
    jobs = jobs[part[0] :: part[1]]
    workers = max(1, min(8, threads or allowed_cpus(), len(jobs)))
    with ThreadPoolExecutor(workers) as pool:
        for found in pool.map(lambda j: _check_file(lay, *j), jobs):
            problems.extend(found)
    return problems


def _shard_records(st: ShardState, sname: str, problems: list[str]) -> dict[int, dict[str, int]]:
    """Chunk -> array -> recorded crc32 from the journal and COMPLETE.json; appends what is wrong."""
    journal = fmt.read_journal(st.dir / fmt.JOURNAL)
    if journal.error:
        problems.append(f"{sname}: {fmt.JOURNAL} cannot be read ({journal.error})")
    for k in journal.bad_lines:
        problems.append(
            f"{sname}: {fmt.JOURNAL} line {k} is damaged (seal mismatch or malformed); "
            "its chunk counts as missing"
        )
    if journal.torn_tail:
        problems.append(f"{sname}: {fmt.JOURNAL} ends in a torn line (interrupted write); resume redoes it")
    crcs: dict[int, dict[str, int]] = {c: journal.done[c] for c in st.done}
    if (st.dir / fmt.COMPLETE).exists() and st.complete_doc is None:
        problems.append(f"{sname}: {fmt.COMPLETE} is damaged or belongs to another manifest")
    if st.missing:
        problems.append(f"{sname}: chunks {fmt.ranges(st.missing)} not written (incomplete)")
    elif not st.complete:
        problems.append(f"{sname}: all chunks written but shard not finished (no valid {fmt.COMPLETE})")
    if st.complete_doc is not None:
        for name, listed in _complete_crcs(st.complete_doc, problems, sname).items():
            for c, crc in zip(st.chunks, listed, strict=False):
                if c in crcs and crcs[c].get(name) != crc:
                    problems.append(f"{sname}: chunk {c} array {name!r}: journal and {fmt.COMPLETE} disagree")
                crcs.setdefault(c, {}).setdefault(name, crc)
    return crcs


def _complete_crcs(doc: dict, problems: list[str], sname: str) -> dict[str, list[int]]:
    """{array: chunk crc32 list} of a COMPLETE.json; malformed entries are reported and skipped."""
    arrays = doc.get("arrays")
    out: dict[str, list[int]] = {}
    for name, a in arrays.items() if isinstance(arrays, dict) else []:
        listed = a.get("chunk_crc32") if isinstance(a, dict) else None
        if isinstance(listed, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in listed):
            out[name] = listed
        else:
            problems.append(f"{sname}: {fmt.COMPLETE} entry of array {name!r} is malformed")
    if not isinstance(arrays, dict):
        problems.append(f"{sname}: {fmt.COMPLETE} has no 'arrays' mapping; it is damaged")
    return out


def _check_file(
    lay: fmt.Layout, sname: str, fpath: Path, i: int, crcs: dict[int, dict[str, int]], name: str
) -> list[str]:
    """Problems of one array file of shard ``i``: header, size, and the crc32 of each recorded chunk."""
    spec = lay.arrays[name]
    header = fmt.npy_header(spec.np_dtype, lay.file_shape(name, i))
    total = len(header) + lay.data_bytes(name, i)
    if not fpath.is_file():
        return [f"{sname}: file {fpath} missing"]
    problems = []
    fd = os.open(fpath, os.O_RDONLY)
    try:
        if os.pread(fd, len(header), 0) != header:
            problems.append(f"{sname}: file {fpath}: .npy header damaged or does not match the manifest")
        size = os.fstat(fd).st_size
        if size != total:
            problems.append(f"{sname}: file {fpath} has {size} bytes, expected {total}")
        row = spec.row_bytes(lay.num_views)
        s_base = lay.shard_samples(i)[0]
        for c in sorted(crcs):
            want = crcs[c].get(name)
            s0, s1 = lay.chunk_range(c)
            if want is None:
                problems.append(f"{sname}: chunk {c} array {name!r}: no checksum recorded")
                continue
            crc, got = _crc_region(fd, len(header) + (s0 - s_base) * row, (s1 - s0) * row)
            if got != (s1 - s0) * row or crc != want:
                problems.append(
                    f"file {fpath} chunk {c} (samples {s0}-{s1 - 1}) array {name!r}: crc32 {crc:08x} != "
                    f"recorded {want:08x}: damaged data; delete the shard folder {fpath.parent} and rerun "
                    "the cache-teacher command to rewrite it"
                )
    finally:
        os.close(fd)
    return problems


def merge(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy the complete (usually multi-shard) cache ``src`` into a single-shard cache at ``dst``.

    Streams chunk by chunk through a normal writer (own journal, resumable, COMPLETE at the end) and
    checks every source chunk against its recorded crc32 before copying. Returns ``dst``.
    """
    s_root, d_root = Path(src), Path(dst)
    if s_root.resolve() == d_root.resolve():
        raise KdpipeError(
            f"cache merge: source and destination are the same folder ({s_root}); give a new --out"
        )
    cache = Cache(s_root, require_complete=True)
    lay = cache.layout
    caller = {k: v for k, v in cache.manifest.items() if k not in fmt.ADDED_KEYS}
    run = dict(caller.get(fmt.RUN_KEY) or {}) if isinstance(caller.get(fmt.RUN_KEY), dict) else {}
    caller[fmt.RUN_KEY] = {**run, "merged_from": str(s_root), "merged_shards": lay.num_shards}
    writer = create_or_resume(d_root, caller, (0, 1))
    with writer:
        parsed = {s.index: fmt.read_journal(s.dir / fmt.JOURNAL) for s in cache.shards}
        journals = {i: j.done for i, j in parsed.items()}
        for c in writer.pending_chunks():
            s0, s1 = lay.chunk_range(c)
            i = lay.shard_of_chunk(c)
            arrays = {}
            for name in lay.arrays:
                a = np.ascontiguousarray(cache.array(name)[s0:s1])
                want = journals[i].get(c, {}).get(name)
                if want is None or zlib.crc32(fmt.byte_view(a)) != want:
                    raise KdpipeError(
                        f"cache merge: source {s_root} chunk {c} array {name!r} is damaged or unrecorded; "
                        f"run `kdpipe cache verify {s_root}`"
                    )
                arrays[name] = a
            writer.write_chunk(c, arrays, parsed[i].nonfinite.get(c))
        writer.finish(allow_nonfinite=True)  # the source was complete: any NaN/inf were accepted there
    return d_root
