"""`kdpipe distill` end to end: the run folder, the exported student, user students, every method."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from _distill import CLASSES, cached, distill_args, read_jsonl, run_ok, val_data

from kdpipe.data import load_dataset
from kdpipe.student import create_model

STEPS = {"KDPIPE_LOG_STEPS": "1"}


def test_run_folder_export_and_evaluate(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_ok(
        distill_args(
            out, "--method", "at", "--val-data", val_data(), cache_path=cached(2, "float16"), epochs=2
        )
    )
    for name in ("config.json", "metrics.jsonl", "summary.json", "student.onnx"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "checkpoints" / "best.pt").is_file()

    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "at" and config["num_views"] == 2 and config["world_size"] == 1
    assert config["pairing"] == [[0, 0], [1, 1], [2, 2]]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_top1"] == metrics[-1]["val_top1"]
    assert summary["best_top1"] == max(m["val_top1"] for m in metrics)
    assert summary["seed"] == 0 and summary["world_size"] == 1 and summary["effective_batch"] == 32
    assert summary["seconds_per_epoch"] > 0 and summary["onnx_max_abs_diff"] < 1e-4

    # the ONNX student against the PyTorch student rebuilt from the last checkpoint
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["module"]
    student = create_model("resnet8", num_classes=CLASSES, in_chans=1)
    student.load_state_dict({k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")})
    ds = load_dataset(val_data())
    x = (np.asarray(ds.load(np.arange(len(ds)))).reshape(len(ds), 1, 16, 16) / 255.0).astype(np.float32)
    with torch.no_grad():
        want = student.eval()(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    top1 = 100.0 * float(np.mean(want.argmax(1) == ds.labels))
    assert top1 == pytest.approx(summary["last_top1"])

    # `kdpipe evaluate` on the exported file reproduces the run's last validation accuracy
    r = run_ok(["evaluate", str(out / "student.onnx"), "--data", val_data()])
    assert json.loads(r.stdout)["top1"] == pytest.approx(summary["last_top1"])


FACTORY = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn = nn.BatchNorm2d(cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + self.skip(x))


class Net(nn.Module):
    def __init__(self, num_classes, in_chans):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 8, 3, 1, 1)
        self.s1 = nn.Sequential(Block(8, 8, 1), Block(8, 8, 1))
        self.s2 = nn.Sequential(Block(8, 12, 2))
        self.s3 = nn.Sequential(Block(12, 16, 2), Block(16, 16, 1))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.s3(self.s2(self.s1(torch.relu(self.stem(x)))))
        return self.head(x.mean((2, 3)))


def make_net(num_classes, in_chans, width=1):
    return Net(num_classes, in_chans)
"""


@pytest.mark.parametrize("form", ["file", "module"])
def test_user_factory_student_with_auto_taps(
    tmp_path: Path, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_students.py").write_text(textwrap.dedent(FACTORY))
    if form == "file":
        spec = f"{tmp_path / 'my_students.py'}:make_net"
    else:
        monkeypatch.syspath_prepend(str(tmp_path))
        spec = "my_students:make_net"
    out = tmp_path / "run"
    r = run_ok(
        distill_args(out, "--student", spec, "--student-arg", "width=1", "--method", "at", "--no-export",
                     "--max-steps", "3", cache_path=cached(2, "float16")),
        STEPS,
    )  # fmt: skip
    # the auto rule picks the three stage containers (the teacher's taps are 16x16, 8x8, 4x4)
    assert "taps: s1 8x16x16, s2 12x8x8, s3 16x4x4" in r.stderr
    steps = read_jsonl(out / "steps.jsonl")
    assert len(steps) == 3 and all(math.isfinite(s["at"]) and s["at"] > 0 for s in steps)


def test_student_taps_by_module_path(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_ok(
        distill_args(out, "--student-taps", "layer1.0,layer2.0,layer3.0", "--method", "dct", "--no-export",
                     "--max-steps", "2", cache_path=cached(2, "float16")),
        STEPS,
    )  # fmt: skip
    assert "pair student layer2.0 (8, 8) <- teacher tap 1 (8, 8)" in r.stderr
    assert json.loads((out / "config.json").read_text())["student_taps"] == [
        "layer1.0",
        "layer2.0",
        "layer3.0",
    ]
    assert len(read_jsonl(out / "steps.jsonl")) == 2


def test_student_taps_pooled_to_teacher_resolution(tmp_path: Path) -> None:
    # stem output (16x16) paired with every teacher tap: the student map is area-pooled to 8x8 and 4x4
    out = tmp_path / "run"
    run_ok(
        distill_args(out, "--student-taps", "layer1,layer1,layer1", "--method", "at", "--no-export",
                     "--max-steps", "2", cache_path=cached(2, "float16")),
        STEPS,
    )  # fmt: skip
    assert all(math.isfinite(s["at"]) for s in read_jsonl(out / "steps.jsonl"))


CASES = {
    "ce": [],
    "kd": ["--optimizer", "adamw", "--lr", "0.001"],
    "at": ["--amp", "bf16"],
    "dct": ["--channels-last"],
    "afd": ["--schedule", "multistep", "--milestones", "1", "--warmup-epochs", "0.5"],
    "at+kd": ["--label-smoothing", "0.1", "--clip-grad", "1.0"],
    "dct+kd": ["--teacher-correct-mask", "--dct-variant", "dft-abs"],
    "afd+kd": [],
}


@pytest.mark.parametrize("method", list(CASES))
def test_every_method_trains_without_nan(tmp_path: Path, method: str) -> None:
    out = tmp_path / "run"
    run_ok(
        distill_args(out, "--method", method, "--no-export", *CASES[method], cache_path=cached(2, "float16"),
                     epochs=2),
        STEPS,
    )  # fmt: skip
    steps = read_jsonl(out / "steps.jsonl")
    assert len(steps) == 8
    terms = set(method.split("+")) | {"ce"}
    for s in steps:
        assert terms <= set(s) and all(math.isfinite(s[t]) for t in (*terms, "loss")), s
    metrics = read_jsonl(out / "metrics.jsonl")
    assert all(math.isfinite(m["train_loss"]) for m in metrics)
    if method == "afd":  # multistep with warm-up: lr ramps over half an epoch, then 0.05 until epoch 1
        assert [m["lr"] for m in metrics] == pytest.approx([0.05 * 1e-8 / 0.5, 0.05 * 0.2])


def test_fixed_teacher_warning(tmp_path: Path) -> None:
    r = run_ok(distill_args(tmp_path / "run", "--method", "kd", "--no-export", "--max-steps", "1",
                            cache_path=cached(2, "float16"), epochs=9))  # fmt: skip
    assert "fixed teacher" in r.stderr and "--views" in r.stderr
    r = run_ok(distill_args(tmp_path / "run2", "--method", "kd", "--no-export", "--max-steps", "1",
                            cache_path=cached(2, "float16"), epochs=8))  # fmt: skip
    assert "fixed teacher" not in r.stderr


def test_a_plain_input_cache_warns_that_training_has_no_augmentation(tmp_path: Path) -> None:
    plain = cached(0, "float16")
    r = run_ok(distill_args(tmp_path / "run", "--method", "kd", "--no-export", "--max-steps", "1",
                            cache_path=plain, epochs=2))  # fmt: skip
    assert "plain input only" in r.stderr and "without augmentation" in r.stderr and "--views" in r.stderr
    r = run_ok(distill_args(tmp_path / "run2", "--method", "kd", "--no-export", "--max-steps", "1",
                            cache_path=plain, epochs=1))  # fmt: skip
    assert "WARNING" not in r.stderr
