"""Mid-epoch checkpoints (--checkpoint-every): a run killed with SIGKILL part-way through an epoch and
resumed gives the same per-step losses as the run that was never killed, bit for bit; damaged or
truncated checkpoints are named in one line and the resume falls back to the previous intact one.

The reference is the uninterrupted run with the same settings (one thread, no worker processes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from _distill import KDPIPE, cached, distill_args, read_jsonl, run_ok, subprocess_env

STEPS = {"KDPIPE_LOG_STEPS": "1"}
EPOCHS = 2  # 128 samples / batch 8 = 16 steps an epoch


def _args(out: Path, *extra: str) -> list[str]:
    args = distill_args(out, "--method", "at+kd", "--no-export", "--checkpoint-every", "3", *extra,
                        cache_path=cached(2, "float16"), epochs=EPOCHS)  # fmt: skip
    args[args.index("--batch-size") + 1] = "8"
    return args


def _env() -> dict[str, str]:
    return subprocess_env() | STEPS


def _steps(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(out / "steps.jsonl")]


def _same_weights(a: Path, b: Path) -> None:
    wa = torch.load(a / "checkpoints" / "last.pt", weights_only=False)
    wb = torch.load(b / "checkpoints" / "last.pt", weights_only=False)
    assert wa["steps"] == wb["steps"] == 16 * EPOCHS
    for name, t in wa["module"].items():
        assert torch.equal(t, wb["module"][name]), name


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_ok(_args(ref), STEPS)
    proc = subprocess.Popen(
        [KDPIPE, *_args(cut)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    trigger = cut / "checkpoints" / "step-000000006.pt"  # epoch 1, step 6 of 16
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None and not trigger.exists():
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run must be killed part-way"
    names = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert not any(n.endswith(".tmp") for n in names if n.startswith("step-") and n.endswith(".pt")), names
    assert len([n for n in names if n.startswith("step-") and n.endswith(".pt")]) <= 2, names  # last two kept

    r = subprocess.run([KDPIPE, *_args(cut, "--resume")], capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("resuming"))
    assert " step " in line, line  # resumed inside an epoch, not at its start
    assert _steps(cut) == _steps(ref)  # every step once, same losses, exactly
    ma, mb = read_jsonl(ref / "metrics.jsonl"), read_jsonl(cut / "metrics.jsonl")
    for key in ("epoch", "lr", "train_loss", "train_ce", "train_kd", "train_at"):
        assert [x[key] for x in ma] == [x[key] for x in mb], key
    _same_weights(ref, cut)


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_damaged_checkpoints_fall_back_to_the_previous_one(tmp_path: Path) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_ok(_args(ref), STEPS)
    run_ok(_args(run, "--max-steps", "8"), STEPS)  # stops inside epoch 1: step-3, step-6, last (8)
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.pt", "step-000000003.pt", "step-000000006.pt"]
    _flip_middle_byte(ck / "last.pt")  # a damaged tensor: only the checksum can tell
    data = (ck / "step-000000006.pt").read_bytes()
    (ck / "step-000000006.pt").write_bytes(data[: len(data) // 3])  # truncated
    r = run_ok(_args(run, "--resume"), STEPS)
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("WARNING: checkpoint")]
    assert len(warnings) == 2, r.stderr
    assert any("last.pt" in w and "checksum" in w for w in warnings), warnings
    assert any("step-000000006.pt" in w for w in warnings), warnings
    assert f"resuming {run} at epoch 1 step 3" in r.stderr
    assert _steps(run) == _steps(ref)
    _same_weights(ref, run)


def test_no_intact_checkpoint_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_ok(_args(run, "--max-steps", "2"))
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    r = subprocess.run([KDPIPE, *_args(run, "--resume")], capture_output=True, text=True, env=_env())
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("kdpipe: error: --resume: no intact checkpoint")
