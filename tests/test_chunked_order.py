"""``distill --order chunked``: a chunk-local shuffle for caches larger than memory, with read-ahead.

The order is checked against its definition (a permutation whose consecutive groups are unions of
whole chunks), the read-ahead against the kernel's own page-residency record (mincore on real files),
and the loop by real runs: a chunked run differs from a random one, and resumes mid-epoch exactly.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

import numpy as np
import pytest
from _distill import N_TRAIN, cached, distill_args, read_jsonl, run_cli, run_ok, teacher, train_data

import kdpipe.cache as kc
from kdpipe.batches import chunked_epoch_order
from kdpipe.distributed import WorldInfo
from kdpipe.train.order import ChunkedOrder, epoch_keys, read_ahead_plan


def _members(chunks: set[int], chunk: int, n: int) -> set[int]:
    return {s for c in chunks for s in range(c * chunk, min(n, (c + 1) * chunk))}


@pytest.mark.parametrize(("n", "chunk", "window"), [(100, 7, 3), (64, 16, 1), (50, 8, 20), (1, 4, 2)])
def test_chunked_order_shuffles_inside_windows_of_whole_chunks(n: int, chunk: int, window: int) -> None:
    order = chunked_epoch_order(5, 2, n, chunk, window)
    assert sorted(order.tolist()) == list(range(n))
    of = order // chunk
    _, first = np.unique(of, return_index=True)
    seq = of[np.sort(first)].tolist()  # chunks in the order they first appear
    pos = 0
    for g in range(0, len(seq), window):  # each group of `window` chunks fills one block of the order
        want = _members(set(seq[g : g + window]), chunk, n)
        assert set(order[pos : pos + len(want)].tolist()) == want
        pos += len(want)
    assert pos == n
    assert np.array_equal(order, chunked_epoch_order(5, 2, n, chunk, window))
    if n > 2 * chunk:
        assert not all(np.all(np.diff(order[k : k + chunk]) == 1) for k in range(0, n - chunk, chunk))


def test_chunked_order_changes_every_epoch_and_keeps_the_global_batch_over_world_sizes() -> None:
    o = ChunkedOrder(chunk=16, window=2)
    assert not np.array_equal(chunked_epoch_order(0, 0, 128, 16, 2), chunked_epoch_order(0, 1, 128, 16, 2))
    one = epoch_keys(0, 1, 128, 4, 32, WorldInfo(0, 0, 1), o)
    two = [epoch_keys(0, 1, 128, 4, 16, WorldInfo(r, r, 2), o) for r in range(2)]
    for s, (samples, views) in enumerate(one):
        assert np.array_equal(samples, np.concatenate([two[0][s][0], two[1][s][0]]))
        assert np.array_equal(views, np.concatenate([two[0][s][1], two[1][s][1]]))
    plan = read_ahead_plan(one, o, 32)  # 32 samples per window = 1 step: step i reads window i + 1 ahead
    assert sorted(plan) == [0, 1, 2]  # at the last step nothing is left to read ahead
    assert set(plan[0]) == set((np.concatenate([one[0][0], one[1][0]]) // 16).tolist())
    assert set(plan[1]) == set((one[2][0] // 16).tolist())


def _resident(path: Path, offset: int, length: int) -> np.ndarray:
    """Per page of bytes [offset, offset + length) of ``path``: 1 if in the page cache (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    page = mmap.PAGESIZE
    start = offset // page * page
    size = offset + length - start
    with path.open("rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # mapping alone faults nothing in
    arr = np.frombuffer(mm, dtype=np.uint8)
    vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
    rc = libc.mincore(arr.ctypes.data + start, size, vec)
    err = ctypes.get_errno()
    del arr
    mm.close()
    assert rc == 0, os.strerror(err)
    return np.frombuffer(bytes(vec), dtype=np.uint8) & 1


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cache(out: Path, views: int = 2, chunk: int = 16) -> str:
    run_ok(["cache-teacher", teacher(), "--data", train_data(), "--out", str(out), "--views", str(views),
            "--chunk-size", str(chunk), "--threads", "1", "--no-progress"])  # fmt: skip
    return str(out)


def test_read_ahead_reads_exactly_the_chunks_asked_for(tmp_path: Path) -> None:
    # a disk-backed folder: tmpfs pages cannot be dropped, so residency would say nothing there
    folder = Path(os.environ.get("KDPIPE_DISK_TMP", "/var/tmp"))
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        pytest.skip(f"no writable disk folder {folder} (set KDPIPE_DISK_TMP)")
    import tempfile

    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        c = kc.open(_cache(Path(tmp) / "cache", views=2, chunk=16))
        lay = c.layout
        path = c.shards[0].dir / "at.0.npy"
        row = lay.arrays["at.0"].row_bytes(lay.num_views)
        head = path.stat().st_size - lay.data_bytes("at.0", 0)
        os.sync()
        _drop(path)
        if _resident(path, head, lay.num_samples * row).any():
            pytest.skip(f"{folder}: the kernel keeps the pages after POSIX_FADV_DONTNEED")
        c.read_ahead(["at.0"], [2, 5])
        want = np.zeros(lay.num_samples * row, dtype=bool)
        for ch in (2, 5):
            s0, s1 = lay.chunk_range(ch)
            want[s0 * row : s1 * row] = True
        deadline = time.monotonic() + 5
        while True:
            got = _resident(path, head, lay.num_samples * row)
            page = mmap.PAGESIZE
            # pages wholly inside the asked ranges must be resident; pages wholly outside them not
            first = head // page * page
            inside = [
                want[max(0, p - head) : p + page - head].all() for p in range(first, head + len(want), page)
            ]
            outside = [
                not want[max(0, p - head) : p + page - head].any()
                for p in range(first, head + len(want), page)
            ]
            if all(g for g, i in zip(got, inside, strict=True) if i) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert all(g for g, i in zip(got, inside, strict=True) if i)
        assert not any(g for g, o in zip(got, outside, strict=True) if o)
        del c


def test_distill_follows_the_chunked_order_and_resumes_it_mid_epoch(tmp_path: Path) -> None:
    cache = _cache(tmp_path / "cache", views=2, chunk=16)  # 8 chunks; windows of 2 chunks

    def args(out: Path, *extra: str) -> list[str]:
        return distill_args(out, "--method", "at+kd", "--no-export", "--checkpoint-every", "1", *extra,
                            cache_path=cache, epochs=2)  # fmt: skip

    r = run_ok(args(tmp_path / "ref", "--order", "chunked:32"))
    assert "order: chunked, windows of 2 chunk(s) x 16 samples" in r.stderr
    run_ok(args(tmp_path / "random"))
    ref, rnd = (
        read_jsonl(tmp_path / "ref" / "metrics.jsonl"),
        read_jsonl(tmp_path / "random" / "metrics.jsonl"),
    )
    assert [x["train_loss"] for x in ref] != [x["train_loss"] for x in rnd]  # the loop took the order
    steps = N_TRAIN // 32
    run_ok(args(tmp_path / "cut", "--order", "chunked:32", "--max-steps", str(steps + 1)))
    run_ok(args(tmp_path / "cut", "--order", "chunked:32", "--resume"))
    cut = read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    assert [x["train_loss"] for x in cut] == [x["train_loss"] for x in ref]
    r = run_cli(args(tmp_path / "cut", "--order", "random", "--resume", "--epochs", "3"))
    assert r.exit_code != 0 and "order 'chunked:32' -> 'random'" in r.stderr


@pytest.mark.parametrize(
    ("order", "cache", "needle"),
    [("chunked", False, "use it with --cache"), ("bogus", True, "use random, chunked"),
     ("chunked:0", True, "positive number of samples"), ("chunked:x", True, "positive number")],
)  # fmt: skip
def test_bad_order_is_one_line(tmp_path: Path, order: str, cache: bool, needle: str) -> None:
    src = {"cache_path": cached(2, "float16")} if cache else {}
    extra = [] if cache else ["--online-teacher", teacher()]
    r = run_cli(distill_args(tmp_path / "run", "--method", "kd", "--order", order, *extra, **src))
    lines = r.stderr.strip().splitlines()
    assert r.exit_code != 0 and len(lines) == 1 and needle in lines[0], r.stderr
