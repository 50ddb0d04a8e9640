"""The demo, reduced: the committed animals teacher -> cache -> distilled student -> ONNX -> evaluate.

Independent checks: the cached logits equal a fresh onnxruntime run of the teacher file on the same
plain inputs (normalised here from the card's numbers, not by kdpipe), and the exported student's
accuracy measured by `kdpipe evaluate` equals the accuracy the run reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "demo"
TEACHER, CARD = DEMO / "teacher-animals.onnx", DEMO / "teacher-animals.yaml"


def kdpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdpipe", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    r = kdpipe(
        "cache-teacher",
        str(TEACHER),
        "--card",
        str(CARD),
        "--data",
        "animals:val",
        "--views",
        "0",
        "--out",
        str(out / "cache"),
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert "teacher top-1" in r.stdout
    r = kdpipe(
        "distill",
        "--cache",
        str(out / "cache"),
        "--data",
        "animals:val",
        "--val-data",
        "animals:val",
        "--student",
        "resnet8",
        "--method",
        "at+kd",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--workers",
        "0",
        "--max-steps",
        "8",
        "--out",
        str(out / "run"),
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    return out


def test_cached_logits_equal_a_fresh_teacher_run(demo_run: Path) -> None:
    import kdpipe.cache
    from kdpipe.data import load_dataset

    card = yaml.safe_load(CARD.read_text())
    scale = 1 / 255 if str(card["scale"]) == "1/255" else float(card["scale"])
    x = load_dataset("animals:val").load(np.arange(64))  # (64, 28, 28, 1) uint8, plain view = as is
    x = ((x.astype(np.float64) * scale - card["mean"][0]) / card["std"][0]).astype(np.float32)
    sess = ort.InferenceSession(str(TEACHER), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x.transpose(0, 3, 1, 2)})[0]
    c = kdpipe.cache.open(str(demo_run / "cache"))
    got = np.asarray(c.targets("logits")[:64, 0], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_exported_student_reproduces_the_reported_accuracy(demo_run: Path) -> None:
    summary = json.loads((demo_run / "run" / "summary.json").read_text())
    assert summary["onnx_max_abs_diff"] < 1e-3
    r = kdpipe("evaluate", str(demo_run / "run" / "student.onnx"), "--data", "animals:val")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["top1"] == pytest.approx(summary["last_top1"], abs=1e-9)


def test_show_maps_writes_a_png(demo_run: Path) -> None:
    png = demo_run / "maps.png"
    r = kdpipe(
        "show-maps",
        str(demo_run / "cache"),
        "--sample",
        "3",
        "--run",
        str(demo_run / "run"),
        "--out",
        str(png),
    )
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
