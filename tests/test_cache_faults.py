"""Fault injection with real processes and files: SIGKILL mid-run, torn journal, flipped bytes, full disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_cache_support import TESTS_DIR, child_script, expected_stored, make_manifest, write_shard

import kdpipe.cache as kc
from kdpipe.cache import format as fmt
from kdpipe.errors import KdpipeError

SHARD = "00000-of-00001"


def _journaled(root, shard=SHARD) -> set[int]:
    return set(fmt.read_journal(root / "shards" / shard / "journal.jsonl").done)


def _assert_equals_reference(root, m):
    for name in m["arrays"]:
        on_disk = np.load(root / "shards" / SHARD / f"{name}.npy")
        np.testing.assert_array_equal(on_disk, expected_stored(m, name), err_msg=name)


def test_sigkill_then_resume_redoes_nothing_finished(tmp_path):
    root, log1, log2 = tmp_path / "c", tmp_path / "run1.log", tmp_path / "run2.log"
    m = make_manifest(num_samples=60, num_views=2, chunk_size=4)  # 15 chunks
    child = subprocess.Popen(child_script(str(root), m, (0, 1), str(log1), 0.15))
    deadline = time.monotonic() + 60
    while not (log1.exists() and len(log1.read_text().split()) >= 4):
        assert child.poll() is None and time.monotonic() < deadline, "writer ended before it was killed"
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    done_before = _journaled(root)
    logged = {int(x) for x in log1.read_text().split()}
    assert logged <= done_before and 4 <= len(done_before) < 15
    with pytest.raises(KdpipeError, match="incomplete"):
        kc.open(root)
    assert not kc.info(root)["complete"]

    subprocess.run(child_script(str(root), m, (0, 1), str(log2), 0.0), check=True, timeout=60)
    redone = [int(x) for x in log2.read_text().split()]
    assert sorted(redone) == sorted(set(range(15)) - done_before)  # finished chunks were not redone
    assert kc.open(root).complete and kc.verify(root) == []
    _assert_equals_reference(root, m)


def test_torn_journal_line_redoes_only_that_chunk(tmp_path):
    root = tmp_path / "c"
    m = make_manifest(num_samples=24, num_views=1, chunk_size=4)  # 6 chunks
    w = kc.create_or_resume(root, m)
    from test_cache_support import chunk_arrays

    for c in range(3):
        w.write_chunk(c, chunk_arrays(m, *w.chunk_range(c)))
    w.close()
    jpath = root / "shards" / SHARD / "journal.jsonl"
    data = jpath.read_bytes()
    jpath.write_bytes(data[: len(data) - 9])  # a crash mid-append: last line cut short, no newline
    assert _journaled(root) == {0, 1}
    assert any("torn" in p for p in kc.verify(root))
    w = kc.create_or_resume(root, m)
    assert w.pending_chunks() == [2, 3, 4, 5]
    for c in w.pending_chunks():
        w.write_chunk(c, chunk_arrays(m, *w.chunk_range(c)))
    w.finish()
    assert kc.verify(root) == [] and kc.open(root).complete
    _assert_equals_reference(root, m)


@pytest.fixture
def good_cache(tmp_path):
    root = tmp_path / "c"
    m = make_manifest(num_samples=40, num_views=2, chunk_size=8)  # 5 chunks
    write_shard(str(root), m, (0, 1))
    assert kc.verify(root) == []
    return root, m


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def test_flipped_data_byte_is_found_with_its_chunk(good_cache):
    root, m = good_cache
    fpath = root / "shards" / SHARD / "at.0.npy"
    header = fmt.npy_header(np.dtype("<f2"), (40, 2, 3, 4))
    row = 2 * 3 * 4 * 2
    _flip(fpath, len(header) + 27 * row + 5)  # sample 27 -> chunk 3
    problems = kc.verify(root)
    assert len(problems) == 1
    assert "chunk 3 (samples 24-31) array 'at.0'" in problems[0] and "damaged" in problems[0]
    with pytest.raises(KdpipeError, match="damaged"):
        kc.merge(root, root.parent / "merged")


@pytest.mark.parametrize(
    "target", ["header", "journal", "complete", "manifest", "last_byte", "truncate", "delete"]
)
def test_every_other_damage_is_reported(good_cache, target):
    root, m = good_cache
    sdir = root / "shards" / SHARD
    if target == "header":
        _flip(sdir / "logits.npy", 30)
    elif target == "journal":
        _flip(sdir / "journal.jsonl", 20)
    elif target == "complete":
        _flip(sdir / "COMPLETE.json", 40)
    elif target == "manifest":
        text = (root / "manifest.json").read_text().replace('"chunk_size": 8', '"chunk_size": 9')
        (root / "manifest.json").write_text(text)
    elif target == "last_byte":
        _flip(sdir / "labels.npy", os.path.getsize(sdir / "labels.npy") - 1)
    elif target == "truncate":
        os.truncate(sdir / "pooled.1.npy", os.path.getsize(sdir / "pooled.1.npy") - 3)
    else:
        (sdir / "view_params.npy").unlink()
    problems = kc.verify(root)
    assert problems, target
    if target == "manifest":
        assert "seal" in problems[0]
        with pytest.raises(KdpipeError, match="damaged"):
            kc.open(root)
    if target == "last_byte":
        assert any("chunk 4" in p and "'labels'" in p for p in problems)
    if target in ("journal", "complete", "delete"):
        with pytest.raises(KdpipeError):
            kc.open(root)


def test_full_disk_fails_at_creation_and_leaves_nothing_complete(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    m = make_manifest(num_samples=8, num_views=1, chunk_size=1024)
    m["arrays"]["logits"]["shape"] = [1 << 20]  # 4 MiB per sample and view, float32
    m["num_samples"] = free // (4 << 20) + 1000  # more than the whole filesystem holds
    with pytest.raises(KdpipeError, match=r"not enough disk space.*bytes.*free"):
        kc.create_or_resume(tmp_path / "c", m)
    assert not list((tmp_path / "c" / "shards" / SHARD).glob("*.npy"))
    with pytest.raises(KdpipeError, match="incomplete"):
        kc.open(tmp_path / "c")
    assert not kc.info(tmp_path / "c")["complete"]


def test_file_size_limit_during_preallocation_is_a_clear_error(tmp_path):
    """A real kernel refusal (RLIMIT_FSIZE -> EFBIG from posix_fallocate) in a child process."""
    root = tmp_path / "c"
    m = make_manifest(num_samples=4000, num_views=4, chunk_size=100)  # logits file ~320 kB
    code = (
        "import resource, signal, sys, json\n"
        f"sys.path.insert(0, {TESTS_DIR!r})\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "import kdpipe.cache as kc\n"
        "from kdpipe.errors import KdpipeError\n"
        "try:\n"
        f"    kc.create_or_resume({str(root)!r}, json.loads(sys.argv[1]))\n"
        "except KdpipeError as e:\n"
        "    print('KDPIPE-ERROR', e); sys.exit(3)\n"
    )
    import json

    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps(m)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 3, r.stderr
    assert "not enough disk space" in r.stdout
    assert not list((root / "shards" / SHARD).glob("*.npy"))  # big partial files removed
    write_shard(str(root), m, (0, 1))  # without the limit the same command succeeds
    assert kc.open(root).complete
