"""Crash safety with real processes and real signals: SIGKILL at random moments, full disks, two
writers on one shard, a cache read while it is being written.

The reference for every resumed result is an uninterrupted run of the same command, re-read from
disk byte for byte (cache files) or record for record (distill metrics, which hold no timings).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _distill import (
    KDPIPE,
    cached,
    distill_args,
    read_jsonl,
    run_cli,
    run_ok,
    run_proc,
    subprocess_env,
    teacher,
    train_data,
)

import kdpipe.cache as kc
from kdpipe.errors import KdpipeError

SHARD = Path("shards") / "00000-of-00001"
KILLS = 20
# what a run writes that records time or place rather than data
VOLATILE = {"lock"}


def _cache_args(out: Path, *extra: str) -> list[str]:
    return [
        "cache-teacher", teacher(), "--data", train_data(), "--out", str(out), "--views", "2",
        "--chunk-size", "8", "--batch-size", "8", "--threads", "1", "--no-progress", *extra,
    ]  # fmt: skip


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [KDPIPE, *args], env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _kill_at(proc: subprocess.Popen, delay: float) -> int:
    """SIGKILL ``proc`` after ``delay`` s unless it ended first; its return code."""
    try:
        return proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=30)


def _kill_when(proc: subprocess.Popen, cond: Any, timeout: float) -> int:
    """SIGKILL ``proc`` as soon as ``cond()`` holds (polled every 0.5 ms); its return code."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if cond():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0005)
    else:
        proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=30)


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return True


def _files(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (relative path -> bytes), without the volatile ones."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in VOLATILE
    }


def _never_falsely_complete(root: Path) -> None:
    """Either the cache is complete and verifies, or every reader refuses it as incomplete."""
    if not (root / "manifest.json").exists():
        return
    c = kc.open(root, require_complete=False)
    if c.complete:
        assert kc.verify(root) == []
    else:
        with pytest.raises(KdpipeError, match="incomplete"):
            kc.open(root)


def _same_cache(a: Path, b: Path) -> None:
    fa, fb = _files(a / SHARD), _files(b / SHARD)
    assert fa.keys() == fb.keys()
    for name in fa:
        if name.endswith(".npy"):
            assert fa[name] == fb[name], name  # byte-identical data files
    # the journal may list chunks in another order after resumes, never other checksums
    assert sorted(fa["journal.jsonl"].splitlines()) == sorted(fb["journal.jsonl"].splitlines())


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted cache-teacher run every interrupted one must equal."""
    ref = tmp_path_factory.mktemp("ref") / "cache"
    run_ok(_cache_args(ref))
    return ref


@pytest.mark.slow
def test_cache_teacher_survives_20_random_sigkills(tmp_path: Path, ref_cache: Path) -> None:
    cut = tmp_path / "cut"
    t0 = time.monotonic()
    assert run_proc(_cache_args(tmp_path / "timed")).returncode == 0  # how long a whole process takes
    span = time.monotonic() - t0
    rng = random.Random(10)
    kills = mid_run = 0
    journal = cut / SHARD / "journal.jsonl"

    def lines() -> int:
        return journal.read_bytes().count(b"\n") if journal.exists() else 0

    while kills < KILLS:
        proc = _start(_cache_args(cut))
        if kills % 2:  # a random moment of the whole process, start-up included
            rc = _kill_at(proc, rng.uniform(0.0, span))
        else:  # a random moment after a random number of journaled chunks (start-up can be most of span)
            after, extra = lines() + rng.randint(1, 12), rng.uniform(0.0, 0.02)
            rc = _kill_when(
                proc, lambda after=after, extra=extra: lines() >= after and _sleep(extra), span * 4
            )
        _never_falsely_complete(cut)
        if rc == -signal.SIGKILL:
            kills += 1
            mid_run += 0 < lines() < 16
        else:
            assert rc == 0
            shutil.rmtree(cut)  # finished before the kill: start over, the kills must land mid-run
    assert mid_run >= KILLS // 4, "too few kills landed between the first and the last chunk"
    r = run_proc(_cache_args(cut))
    assert r.returncode == 0, r.stderr
    assert kc.open(cut).complete and kc.verify(cut) == []
    _same_cache(ref_cache, cut)


def _distill_args(out: Path, *extra: str) -> list[str]:
    return distill_args(out, "--method", "at+kd", "--no-export", *extra, cache_path=cached(2), epochs=6)


def _metric_rows(out: Path) -> list[dict]:
    timing = {"seconds", "images_per_s", "img_per_s", "data_wait_s", "time"}
    return [{k: v for k, v in r.items() if k not in timing} for r in read_jsonl(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted distill run every interrupted one must equal."""
    ref = tmp_path_factory.mktemp("ref") / "run"
    run_ok(_distill_args(ref))
    return ref


@pytest.mark.slow
def test_distill_killed_at_random_moments_resumes_bit_for_bit(tmp_path: Path, ref_run: Path) -> None:
    cut = tmp_path / "cut"
    t0 = time.monotonic()
    assert run_proc(_distill_args(tmp_path / "timed")).returncode == 0
    span = time.monotonic() - t0
    rng = random.Random(11)
    tmp = cut / "checkpoints" / "last.tmp"
    mid_write = 0
    for _ in range(6):  # watch for a checkpoint being written and kill right then
        rc = _kill_when(_start(_distill_args(cut, "--resume")), tmp.exists, span)
        assert rc in (0, -signal.SIGKILL)
        mid_write += tmp.exists()  # a kill inside save_checkpoint leaves its temp file, never last.pt
        if mid_write:
            break
    assert mid_write, "no kill landed while a checkpoint was being written"
    for _ in range(5):  # and at random moments
        rc = _kill_at(_start(_distill_args(cut, "--resume")), rng.uniform(0.3 * span, span))
        assert rc in (0, -signal.SIGKILL)
    r = run_proc(_distill_args(cut, "--resume"))
    assert r.returncode == 0, r.stderr
    assert _metric_rows(ref_run) == _metric_rows(cut)  # exactly equal, every epoch once


# ------------------------------------------------------------------------------------- full disks
@contextlib.contextmanager
def _small_fs(size_mib: int) -> Iterator[Path]:
    """A tmpfs of ``size_mib`` MiB (root only); skips the test where mounting is not allowed."""
    d = Path(tempfile.mkdtemp(prefix="kdpipe-fs-"))
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(d)], capture_output=True
    )
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount a size-limited tmpfs here ({r.stderr.decode().strip()[:80]})")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()


def _fill(fs: Path, leave: int = 0) -> Path:
    """Fill ``fs`` up to ``leave`` free bytes with one file (removed to 'free some space')."""
    filler = fs / "filler"
    free = shutil.disk_usage(fs).free - leave
    # unbuffered: a buffered file would flush its unwritten tail at close() and raise ENOSPC there,
    # outside the suppress, whenever the job under test took some of the space in between
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        f.write(b"\0" * max(free, 0))
    return filler


def _one_line(r: Any, expect: str) -> None:
    """A real process's or click's result: exit 2, one error line that holds ``expect``."""
    assert getattr(r, "returncode", getattr(r, "exit_code", None)) == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr
    assert lines[-1].startswith("kdpipe: error: ") and expect in lines[-1], r.stderr


def test_cache_teacher_disk_full_mid_run_then_resume(ref_cache: Path) -> None:
    with _small_fs(8) as fs:
        out = fs / "cache"
        proc = _start(_cache_args(out))
        journal = out / SHARD / "journal.jsonl"
        deadline = time.monotonic() + 60
        while not (journal.exists() and journal.read_bytes().count(b"\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "finished before the disk filled"
            time.sleep(0.002)
        filler = _fill(fs)  # the data files are preallocated: the journal is what runs out of space
        _, err = proc.communicate(timeout=60)
        r = subprocess.CompletedProcess(proc.args, proc.returncode, "", err.decode())
        if r.returncode == 0:
            pytest.skip("the run finished before the disk filled up")
        _one_line(r, "")
        assert not kc.open(out, require_complete=False).complete
        with pytest.raises(KdpipeError, match="incomplete"):
            kc.open(out)
        filler.unlink()
        run_ok(_cache_args(out))  # the same command, once space is freed
        assert kc.verify(out) == []
        _same_cache(ref_cache, out)


def test_distill_disk_full_keeps_the_last_checkpoint(ref_run: Path) -> None:
    with _small_fs(64) as fs:
        out = fs / "run"
        run_ok(_distill_args(out, "--max-steps", "8"))  # two good epochs, then the disk is full
        ckpt = (out / "checkpoints" / "last.pt").read_bytes()
        filler = _fill(fs, leave=4096)
        r = run_proc(_distill_args(out, "--resume"))
        _one_line(r, "disk")
        assert (out / "checkpoints" / "last.pt").read_bytes() == ckpt  # what was complete is kept
        assert not list((out / "checkpoints").glob("*.tmp"))
        filler.unlink()
        run_ok(_distill_args(out, "--resume"))
        assert _metric_rows(ref_run) == _metric_rows(out)


# ------------------------------------------------------------------------------------ concurrency
def test_second_writer_on_the_same_shard_is_refused(tmp_path: Path, ref_cache: Path) -> None:
    out = tmp_path / "c"
    first = _start(_cache_args(out))
    lock = out / SHARD / "lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text().strip()):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    second = run_proc(_cache_args(out))
    if first.poll() is None or second.returncode != 0:
        _one_line(second, "being written by another process")
    assert first.wait(timeout=120) == 0
    assert kc.verify(out) == []
    _same_cache(ref_cache, out)


def test_distill_refuses_a_cache_still_being_written(tmp_path: Path) -> None:
    out = tmp_path / "c"
    run_ok(_cache_args(out, "--shard", "0/2"))  # shard 1 of 2 never ran
    r = run_cli(distill_args(tmp_path / "run", "--method", "at", "--no-export", cache_path=str(out)))
    _one_line(r, "incomplete")
    assert "00001-of-00002 not started" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_distill_stops_on_a_flipped_byte_and_keeps_no_checkpoint(tmp_path: Path) -> None:
    src = Path(cached(2))
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    f = bad / SHARD / "at.1.npy"
    data = bytearray(f.read_bytes())
    data[-7] ^= 0x04
    f.write_bytes(bytes(data))
    run = tmp_path / "run"
    r = run_proc(distill_args(run, "--method", "at", "--no-export", cache_path=str(bad)))
    _one_line(r, f"file {f} chunk")
    assert "'at.1'" in r.stderr and not (run / "checkpoints" / "last.pt").exists()
    # --no-verify is the user's explicit choice, and is said
    r = run_ok(distill_args(run, "--method", "at", "--no-export", "--max-steps", "1", "--no-verify",
                            cache_path=str(bad)))  # fmt: skip
    assert "NOT verified (--no-verify)" in r.stderr


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest", "journal-line-removed", "journal-edit"])
def test_distill_refuses_every_other_damage(tmp_path: Path, damage: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(cached(2), bad)
    sdir = bad / SHARD
    if damage == "truncate":
        os.truncate(sdir / "logits.npy", (sdir / "logits.npy").stat().st_size - 5)
    elif damage == "delete":
        (sdir / "at.0.npy").unlink()
    elif damage == "manifest":
        text = (bad / "manifest.json").read_text()
        (bad / "manifest.json").write_text(text.replace('"num_views": 2', '"num_views": 3'))
    else:
        lines = (sdir / "journal.jsonl").read_text().splitlines()
        if damage == "journal-line-removed":
            lines = lines[1:]
        else:
            lines[0] = lines[0].replace('"rows":', '"rows":1', 1)  # an edited line: its seal no longer fits
        (sdir / "journal.jsonl").write_text("".join(x + "\n" for x in lines))
    run = tmp_path / "run"
    r = run_cli(distill_args(run, "--method", "at+kd", "--no-export", cache_path=str(bad)))
    _one_line(r, "")
    assert not (run / "checkpoints" / "last.pt").exists()
