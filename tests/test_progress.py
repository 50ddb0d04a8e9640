"""Progress output: a plain line about every 10 % when the stream is not a terminal, nothing when off."""

from __future__ import annotations

import io
from pathlib import Path

from _distill import cached, distill_args, run_proc

from kdpipe.progress import Progress


def test_plain_lines_every_tenth_in_a_log_file() -> None:
    stream = io.StringIO()  # not a terminal
    bar = Progress(1000, "epoch 1/3", stream=stream)
    for _ in range(100):
        bar.update(10, loss=0.5)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 10 <= len(lines) <= 12, lines  # the start, then one per tenth (no duplicate at close)
    assert lines[-1].startswith("epoch 1/3: 100%") and "1000/1000" in lines[-1] and "loss=0.5" in lines[-1]


def test_disabled_writes_nothing() -> None:
    stream = io.StringIO()
    bar = Progress(100, "x", enabled=False, stream=stream)
    bar.update(100)
    bar.close()
    assert stream.getvalue() == ""


def test_distill_progress_in_a_log(tmp_path: Path) -> None:
    args = distill_args(tmp_path / "run", "--method", "kd", "--no-export", cache_path=cached(2, "float16"))
    args.remove("--no-progress")
    r = run_proc(args)  # stderr is a pipe, as in a cluster job's log
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("epoch 1/1:")]
    assert len(lines) == 5 and "\r" not in r.stderr  # 0 %, then each of the 4 steps (25 % each)
    quiet = run_proc(
        distill_args(tmp_path / "quiet", "--method", "kd", "--no-export", cache_path=cached(2, "float16"))
    )
    assert not any(ln.startswith("epoch 1/1:") for ln in quiet.stderr.splitlines())
