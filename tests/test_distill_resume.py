"""A run killed with SIGKILL and resumed with --resume is bit-for-bit the run that was never killed.

The epoch order and views are pure functions of (seed, epoch); the checkpoint holds the weights, the
optimizer (momentum), the torch RNG and the step count, and is replaced atomically. Both runs use one
thread and no worker processes, so the floating-point operations are the same, in the same order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from _distill import KDPIPE, cached, distill_args, read_jsonl, run_cli, run_ok, subprocess_env, val_data

EPOCHS = 12


def _args(out: Path, *extra: str) -> list[str]:
    return distill_args(
        out, "--method", "at+kd", "--val-data", val_data(), "--no-export", *extra,
        cache_path=cached(2, "float16"), epochs=EPOCHS,
    )  # fmt: skip


def _kill_after_epoch(out: Path, k: int) -> int:
    """Start the run as a real process, SIGKILL it once metrics.jsonl holds >= k epochs."""
    proc = subprocess.Popen(
        [KDPIPE, *_args(out)[0:]], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= k:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode() if proc.stderr else ""
    return int(torch.load(out / "checkpoints" / "last.pt", weights_only=False)["epoch"])


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_ok(_args(ref))
    done = _kill_after_epoch(cut, 3)
    assert 2 <= done < EPOCHS, "the run must be killed part-way"  # 2: killed before checkpoint 3

    r = subprocess.run(
        [KDPIPE, *_args(cut, "--resume")], capture_output=True, text=True, env=subprocess_env()
    )
    assert r.returncode == 0, r.stderr
    assert f"resuming {cut} at epoch {done + 1}" in r.stderr

    a, b = read_jsonl(ref / "metrics.jsonl"), read_jsonl(cut / "metrics.jsonl")
    assert [x["epoch"] for x in b] == list(range(1, EPOCHS + 1))  # no epoch logged twice or lost
    for key in ("train_loss", "train_ce", "train_kd", "train_at", "val_top1", "val_loss", "lr"):
        assert [x[key] for x in a] == [x[key] for x in b], key  # exactly equal, not approximately
    wa = torch.load(ref / "checkpoints" / "last.pt", weights_only=False)
    wb = torch.load(cut / "checkpoints" / "last.pt", weights_only=False)
    assert wa["module"].keys() == wb["module"].keys()
    for name, t in wa["module"].items():
        assert torch.equal(t, wb["module"][name]), name
    assert wa["best"] == wb["best"] and wa["steps"] == wb["steps"]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ref, cut))
    assert sa["best_top1"] == sb["best_top1"] and sa["last_top1"] == sb["last_top1"]


def test_log_records_past_the_checkpoint_are_dropped_on_resume(tmp_path: Path) -> None:
    # a kill between "metrics line of epoch k+1 written" and "checkpoint k+1 replaced" leaves one
    # record the checkpoint does not know: the resumed run must not log that epoch twice
    out = tmp_path / "run"
    run_ok(distill_args(out, "--method", "kd", "--no-export", cache_path=cached(2, "float16"), epochs=2))
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    state["epoch"] = 1  # pretend the kill came before the epoch-2 checkpoint
    torch.save(state, out / "checkpoints" / "last.pt")
    run_ok(
        distill_args(
            out, "--method", "kd", "--no-export", "--resume", cache_path=cached(2, "float16"), epochs=2
        )
    )
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_existing_run_without_resume_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = distill_args(
        out, "--method", "kd", "--no-export", "--max-steps", "1", cache_path=cached(2, "float16")
    )
    run_ok(args)
    r = run_cli(args)
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "already holds a run" in lines[0] and "--resume" in lines[0]


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_ok(
        distill_args(
            out, "--method", "kd", "--no-export", "--max-steps", "1", cache_path=cached(2, "float16")
        )
    )
    r = run_cli(
        distill_args(out, "--method", "at", "--no-export", "--resume", cache_path=cached(2, "float16"))
    )
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "other settings" in lines[0] and "method 'kd' -> 'at'" in lines[0]


def test_resume_without_a_checkpoint_starts_a_new_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_ok(distill_args(out, "--method", "kd", "--no-export", "--resume", "--max-steps", "1",
                            cache_path=cached(2, "float16")))  # fmt: skip
    assert "holds no checkpoint yet; starting a new run" in r.stderr
    assert (out / "checkpoints" / "last.pt").exists()
