"""What a run writes for people and their tools: per-step records (step_metrics.jsonl), TensorBoard
event files read back with TensorBoard's own reader, the summary (table, version, git commit) and the
show-curves figure."""

from __future__ import annotations

import json
import math
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
from _distill import cached, distill_args, read_jsonl, run_cli, run_ok, val_data
from PIL import Image

STEPS = {"KDPIPE_LOG_STEPS": "1"}
LR = 0.05
EPOCHS = 2
PER_EPOCH = 4  # 128 samples / batch 32


def _cosine(epoch_float: float) -> float:  # the documented schedule, written out independently
    return LR * 0.5 * (1 + math.cos(math.pi * epoch_float / EPOCHS))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("logs") / "run"
    r = run_ok(distill_args(out, "--method", "at+kd", "--val-data", val_data(), "--log-every", "2",
                            cache_path=cached(2, "float16"), epochs=EPOCHS), STEPS)  # fmt: skip
    return out, r.stderr


def test_step_records(run: tuple[Path, str]) -> None:
    out, _ = run
    recs = read_jsonl(out / "step_metrics.jsonl")
    assert [r["step"] for r in recs] == [2, 4, 6, 8]
    every = {(r["epoch"], r["step"]): r for r in read_jsonl(out / "steps.jsonl")}  # every step
    for r in recs:
        assert (
            r["epoch"] == (r["step"] - 1) // PER_EPOCH + 1 and r["epoch_step"] == (r["step"] - 1) % PER_EPOCH
        )
        assert r["lr"] == pytest.approx(_cosine(r["epoch"] - 1 + r["epoch_step"] / PER_EPOCH), rel=1e-12)
        # the documented weights of at+kd: 0.1 ce + 0.9 kd + 1000 at
        assert r["loss"] == pytest.approx(0.1 * r["ce"] + 0.9 * r["kd"] + 1000 * r["at"], rel=1e-5)
        assert r["loss"] == every[(r["epoch"] - 1, r["epoch_step"])]["loss"]
        assert r["images_per_s"] > 0 and 0 <= r["data_wait_s"] < 10
    epochs = read_jsonl(out / "metrics.jsonl")  # the epoch records stay as they were
    assert [m["epoch"] for m in epochs] == [1, 2] and all("val_top1" in m for m in epochs)


def test_default_log_interval_gives_one_record_per_step_on_short_epochs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_ok(
        distill_args(
            out, "--method", "kd", "--no-export", "--no-tensorboard", cache_path=cached(2, "float16")
        )
    )
    assert [r["step"] for r in read_jsonl(out / "step_metrics.jsonl")] == [1, 2, 3, 4]  # 4 steps < 50
    assert not (out / "tensorboard").exists()


def test_tensorboard_events_read_back(run: tuple[Path, str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    recs = read_jsonl(out / "step_metrics.jsonl")
    for key in ("loss", "ce", "kd", "at", "lr", "images_per_s", "data_wait_s"):
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [r["step"] for r in recs], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in recs], rel=1e-6), key
    top1 = acc.Scalars("val/epoch_top1")
    assert [e.step for e in top1] == [4, 8]
    assert [e.value for e in top1] == pytest.approx(
        [m["val_top1"] for m in read_jsonl(out / "metrics.jsonl")]
    )
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"method": "at+kd"' in text and '"world_size": 1' in text


def test_summary_table_version_and_commit(run: tuple[Path, str]) -> None:
    out, stderr = run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kdpipe"] == version("kdpipe")
    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert summary["git_commit"].split("-")[0] == head.stdout.strip()
    assert summary["world_sizes"] == [1]
    lines = stderr.splitlines()
    table = lines[lines.index(next(ln for ln in lines if "best val top-1" in ln)) :]
    assert f"{summary['best_top1']:.2f} %" in table[0]
    assert any("last val top-1" in ln and f"{summary['last_top1']:.2f} %" in ln for ln in table)
    assert any("time per epoch" in ln for ln in table) and any("images per second" in ln for ln in table)
    assert any("student ONNX" in ln and str(out / "student.onnx") in ln for ln in table)


def test_show_curves(run: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = run
    plain = tmp_path / "plain"
    run_ok(distill_args(plain, "--method", "ce", "--val-data", val_data(), "--no-export",
                        cache_path=cached(2, "float16")))  # fmt: skip
    png = tmp_path / "curves.png"
    r = run_ok(["show-curves", str(out), str(plain), "--out", str(png)])
    assert "2 run(s)" in r.stdout
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 600
    r = run_cli(["show-curves", str(tmp_path / "nowhere"), "--out", str(png)])
    assert r.exit_code == 2 and r.stderr.startswith("kdpipe: error: ") and len(r.stderr.splitlines()) == 1
