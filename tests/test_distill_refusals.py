"""User mistakes end as one line on stderr ("kdpipe: error: ...") and a non-zero exit, no traceback."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from _distill import cached, distill_args, run_cli, run_proc, teacher, train_data, val_data

from kdpipe import cache as cache_mod


def _one_line(r: object, *needles: str) -> str:
    exit_code = getattr(r, "exit_code", None)
    if exit_code is None:
        exit_code = r.returncode  # type: ignore[attr-defined]
    stderr: str = r.stderr  # type: ignore[attr-defined]
    assert exit_code != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("kdpipe: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _incomplete_cache(path: Path) -> str:
    """A cache whose writer wrote one chunk of four and never finished (as if killed)."""
    src = cache_mod.open(cached(2, "float16"))
    manifest = copy.deepcopy(src.manifest)
    manifest["chunk_size"] = 32
    writer = cache_mod.create_or_resume(path, manifest)
    start, stop = writer.chunk_range(writer.pending_chunks()[0])
    rows = np.arange(start, stop)
    arrays = {name: np.asarray(src.array(name)[rows]) for name in manifest["arrays"]}
    writer.write_chunk(writer.pending_chunks()[0], arrays)
    writer.close()
    assert not cache_mod.open(path, require_complete=False).complete
    return str(path)


def test_incomplete_cache(tmp_path: Path) -> None:
    r = run_cli(distill_args(tmp_path / "run", cache_path=_incomplete_cache(tmp_path / "partial")))
    line = _one_line(r, "partial")
    assert "missing" in line or "not finished" in line or "incomplete" in line
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_cache_from_another_dataset(tmp_path: Path) -> None:
    args = distill_args(tmp_path / "run", cache_path=cached(2, "float16"))
    args[args.index("--data") + 1] = val_data()
    _one_line(run_cli(args), "is not the dataset the cache was made from", "train.npz")


def test_method_needs_targets_the_cache_lacks(tmp_path: Path) -> None:
    c = cached(0, "float16", "logits")
    _one_line(run_cli(distill_args(tmp_path / "run", "--method", "at", cache_path=c)), "at.0", "--targets")
    _one_line(run_cli(distill_args(tmp_path / "run", "--method", "afd", cache_path=c)), "pooled.0")


def test_unknown_student_lists_close_matches(tmp_path: Path) -> None:
    r = run_cli(distill_args(tmp_path / "run", "--student", "resnet-20", cache_path=cached(2, "float16")))
    _one_line(r, "resnet-20", "resnet20")
    r = run_cli(
        distill_args(
            tmp_path / "run", "--student", "nowhere_pkg.models:make", cache_path=cached(2, "float16")
        )
    )
    _one_line(r, "nowhere_pkg")


def test_unknown_method_and_weight(tmp_path: Path) -> None:
    _one_line(
        run_cli(distill_args(tmp_path / "r", "--method", "at+fitnet", cache_path=cached(2, "float16"))),
        "fitnet",
    )
    _one_line(
        run_cli(distill_args(tmp_path / "r", "--weight", "atx=3", cache_path=cached(2, "float16"))), "atx"
    )


@pytest.mark.parametrize("which", ["both", "neither"])
def test_exactly_one_teacher_source(tmp_path: Path, which: str) -> None:
    extra = ["--online-teacher", teacher()] if which == "both" else []
    c = cached(2, "float16") if which == "both" else None
    _one_line(run_cli(distill_args(tmp_path / "run", *extra, cache_path=c)), "--cache", "--online-teacher")


def test_tap_count_mismatch(tmp_path: Path) -> None:
    r = run_cli(distill_args(tmp_path / "run", "--method", "at", "--student-taps", "layer1,layer2",
                             cache_path=cached(2, "float16")))  # fmt: skip
    _one_line(r, "one to one", "--student-taps")


def test_unknown_student_tap(tmp_path: Path) -> None:
    r = run_cli(distill_args(tmp_path / "run", "--method", "at", "--student-taps", "layer1,layer2,layer4",
                             cache_path=cached(2, "float16")))  # fmt: skip
    _one_line(r, "layer4", "layer1")


def test_refusal_from_a_real_process(tmp_path: Path) -> None:
    # the console script itself: exit code, one line, nothing else on stderr
    _one_line(run_proc(distill_args(tmp_path / "run", cache_path=_incomplete_cache(tmp_path / "p"))), "p")
    assert train_data()
