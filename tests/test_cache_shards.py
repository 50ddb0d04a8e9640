"""Sharded writing by independent processes, reading as one logical cache, merging, locking."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from test_cache_support import child_script, decoded, expected_stored, make_manifest, write_shard

import kdpipe.cache as kc
from kdpipe.cache.reader import ShardedArray
from kdpipe.errors import KdpipeError


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A cache written by 3 concurrent processes (shards 0/3, 1/3, 2/3) plus its manifest."""
    root = tmp_path_factory.mktemp("sharded") / "c"
    m = make_manifest(num_samples=61, num_views=2, chunk_size=5)  # 13 chunks: 4 + 4 + 5
    procs = [subprocess.Popen(child_script(str(root), m, (i, 3), None, 0.0)) for i in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    return root, m


def test_three_processes_make_one_logical_cache(sharded):
    root, m = sharded
    assert sorted(p.name for p in (root / "shards").iterdir()) == [
        "00000-of-00003",
        "00001-of-00003",
        "00002-of-00003",
    ]
    c = kc.open(root)
    assert c.complete and len(c) == 61
    for name in m["arrays"]:
        arr = c.array(name)
        assert isinstance(arr, ShardedArray) and arr.shape == expected_stored(m, name).shape
        np.testing.assert_array_equal(arr[:], expected_stored(m, name), err_msg=name)
    assert kc.verify(root) == []


def test_sharded_array_indexing_matches_numpy(sharded):
    root, m = sharded
    c = kc.open(root)
    arr, ref = c.array("at.0"), expected_stored(m, "at.0")
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 61, size=40)
    keys = [
        7,
        -1,
        slice(None),
        slice(3, 9),  # inside shard 0: a view
        slice(15, 50, 3),  # across shards
        slice(None, None, -2),
        idx,
        idx.reshape(5, 8),
        np.array([], dtype=np.int64),
        (idx, 1),
        (idx, slice(None), 2),
        (slice(10, 40), 0, slice(1, 3)),
        (idx, rng.integers(0, 2, size=40)),  # paired sample/view arrays
        (5, [0, 1]),
        ref[:, 0, 0, 0] > 0,  # boolean mask over samples
    ]
    for key in keys:
        np.testing.assert_array_equal(arr[key], ref[key], err_msg=repr(key))
    s, v = rng.integers(0, 61, 33), rng.integers(0, 2, 33)
    np.testing.assert_array_equal(c.gather("dct.dft-abs.0", s, v), decoded(m, "dct.dft-abs.0")[s, v])
    np.testing.assert_array_equal(c.labels, expected_stored(m, "labels"))
    with pytest.raises(IndexError):
        arr[61]


def test_merge_gives_a_single_shard_copy(sharded, tmp_path):
    root, m = sharded
    dst = kc.merge(root, tmp_path / "merged")
    assert [p.name for p in (dst / "shards").iterdir()] == ["00000-of-00001"]
    c = kc.open(dst)
    for name in m["arrays"]:
        on_disk = np.load(dst / "shards" / "00000-of-00001" / f"{name}.npy")
        np.testing.assert_array_equal(on_disk, expected_stored(m, name), err_msg=name)
        assert isinstance(c.array(name), np.memmap)
    assert kc.verify(dst) == [] and c.manifest["run"]["merged_shards"] == 3
    with pytest.raises(KdpipeError, match="same folder"):
        kc.merge(root, root)


def test_missing_shard_is_reported_and_refused(tmp_path):
    root = tmp_path / "c"
    m = make_manifest(num_samples=40, num_views=1, chunk_size=5, run={"command": "kdpipe cache-teacher X"})
    write_shard(str(root), m, (0, 2))
    with pytest.raises(
        KdpipeError, match=r"shard 00001-of-00002 not started.*resume with: kdpipe cache-teacher X"
    ):
        kc.open(root)
    c = kc.open(root, require_complete=False)
    assert not c.complete
    np.testing.assert_array_equal(c.array("logits")[:20], expected_stored(m, "logits")[:20])
    with pytest.raises(KdpipeError, match="not been written"):
        c.array("logits")[25]
    problems = kc.verify(root)
    assert len(problems) == 1 and "00001-of-00002: not started" in problems[0]
    with pytest.raises(KdpipeError, match="incomplete"):
        kc.merge(root, tmp_path / "m")
    assert kc.info(root)["shards"]["complete"] == 1


def test_one_shard_has_one_writer(tmp_path):
    m = make_manifest()
    w = kc.create_or_resume(tmp_path / "c", m, (1, 2))
    with pytest.raises(KdpipeError, match="being written by another process"):
        kc.create_or_resume(tmp_path / "c", m, (1, 2))
    kc.create_or_resume(tmp_path / "c", m, (0, 2)).close()  # the other shard is free
    w.close()
    kc.create_or_resume(tmp_path / "c", m, (1, 2)).close()  # released


def _hold(root, m):
    """A child process that opens shard 0/1 for writing and keeps its lock until stdin closes."""
    code = (f"import kdpipe.cache as kc, sys\nw = kc.create_or_resume({str(root)!r}, {m!r}, (0, 1))\n"
            "print('held', flush=True)\nsys.stdin.read()")  # fmt: skip
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_complete_shard_opens_read_only_while_another_process_holds_it(tmp_path):
    """Two jobs rerun on a finished cache: the second finds nothing to do instead of failing, and
    changes nothing: the same COMPLETE.json (inode, mtime), the holder's lock line, no writes."""
    m = make_manifest(num_samples=12, chunk_size=5)
    root = tmp_path / "c"
    write_shard(str(root), m, (0, 1))
    shard = root / "shards" / "00000-of-00001"
    holder = _hold(root, m)
    try:
        done, lock = (shard / "COMPLETE.json").stat(), (shard / "lock").read_text()
        files = {f.name: f.read_bytes() for f in shard.iterdir()}
        w = kc.create_or_resume(root, m, (0, 1))
        assert w.read_only and w.complete and w.pending_chunks() == []
        with pytest.raises(KdpipeError, match="read-only"):
            w.write_chunk(0, {})
        w.finish()  # already sealed: nothing is rewritten
        after = (shard / "COMPLETE.json").stat()
        assert (after.st_ino, after.st_mtime_ns) == (done.st_ino, done.st_mtime_ns)
        assert (shard / "lock").read_text() == lock and f"pid {holder.pid} " in lock
        assert {f.name: f.read_bytes() for f in shard.iterdir()} == files
        assert kc.verify(root) == []
    finally:
        holder.communicate("", timeout=30)


def test_a_sealed_shard_with_missing_journal_lines_stays_locked(tmp_path):
    """COMPLETE.json alone is not enough: a journal that lacks a chunk means a writer may be redoing it."""
    m = make_manifest(num_samples=12, chunk_size=5)
    root = tmp_path / "c"
    write_shard(str(root), m, (0, 1))
    journal = root / "shards" / "00000-of-00001" / "journal.jsonl"
    journal.write_text("".join(journal.read_text().splitlines(keepends=True)[:-1]))
    holder = _hold(root, m)
    try:
        with pytest.raises(KdpipeError, match="being written by another process"):
            kc.create_or_resume(root, m, (0, 1))
    finally:
        holder.communicate("", timeout=30)


def test_numpy_alone_reads_the_sharded_cache(sharded):
    """The recipe of docs/cache-format.md: manifest + np.load of each shard file, no kdpipe."""
    import json

    root, m = sharded
    stored = json.loads((root / "manifest.json").read_text())
    n = stored["shards"]["count"]
    for name in m["arrays"]:
        parts = [
            np.load(root / "shards" / f"{i:05d}-of-{n:05d}" / f"{name}.npy", mmap_mode="r") for i in range(n)
        ]
        np.testing.assert_array_equal(np.concatenate(parts), expected_stored(m, name), err_msg=name)
    assert [c1 - c0 for c0, c1 in stored["shards"]["chunks"]] == [4, 4, 5]


def test_more_shards_than_chunks(tmp_path):
    root = tmp_path / "c"
    m = make_manifest(num_samples=10, num_views=2, chunk_size=4)  # 3 chunks, 5 shards: two are empty
    for i in range(5):
        write_shard(str(root), m, (i, 5), storage=True)
    c = kc.open(root)
    np.testing.assert_array_equal(c.array("at.0")[[9, 0, 5]], expected_stored(m, "at.0")[[9, 0, 5]])
    assert kc.verify(root) == [] and kc.info(root)["shards"]["complete"] == 5
