"""Every user mistake of issue 10's list: one line on stderr naming what, where and how to fix, exit 2,
no traceback (``--debug`` shows it). Through the real click command on real files.

Cases already covered elsewhere are named in docs/reliability.md (unknown teacher tap:
test_cache_teacher.py; student taps that cannot pair, another dataset, resume with other settings:
test_distill_refusals.py, test_distill_resume.py; another teacher: test_cache_teacher.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _distill import cached, distill_args, export_quiet, run_cli, run_ok, teacher, train_data
from _models import ops_model
from PIL import Image

import kdpipe.cache as kc
from kdpipe.cache import format as fmt
from kdpipe.errors import KdpipeError


def _one_line(r, *expect: str) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stderr, r.stdout)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("kdpipe: error: "), lines[0]
    for e in expect:
        assert e in lines[0], (e, lines[0])
    assert "Traceback" not in r.stderr + r.stdout
    return lines[0]


def _cache(teacher_path: str, data: str, out: Path, *extra: str):
    args = ["cache-teacher", teacher_path, "--data", data, "--out", str(out), "--threads", "1"]
    return run_cli([*args, "--no-progress", *extra])


def _images(root: Path, classes: int = 2, per: int = 3, side: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per):
            pixels = rng.integers(0, 255, (side, side), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------- teachers
def test_missing_corrupt_or_non_onnx_teacher(tmp_path: Path) -> None:
    _one_line(
        _cache(str(tmp_path / "nope.onnx"), train_data(), tmp_path / "c"), "nope.onnx", "does not exist"
    )
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(Path(teacher()).read_bytes()[:3000])
    _one_line(_cache(str(cut), train_data(), tmp_path / "c"), "cut.onnx")
    png = tmp_path / "picture.onnx"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png, format="PNG")
    _one_line(_cache(str(png), train_data(), tmp_path / "c"), "picture.onnx")
    assert not (tmp_path / "c").exists()  # nothing written for a teacher that cannot load


def test_model_without_an_image_input(tmp_path: Path) -> None:
    class Vec(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    path = export_quiet(Vec(), torch.zeros(2, 5), tmp_path / "vec.onnx")
    _one_line(_cache(str(path), train_data(), tmp_path / "c"), "no image-like", "vec.onnx")


def _folded_teacher(path: Path) -> str:
    """(N, 1, 16, 16) -> Conv -> Relu "r" -> Reshape to (4N, 4, 8, 8) -> Conv "c"; logits from "r".
    Static shape inference gives "c" (None, 4, 8, 8), like a batch-first map (a video teacher that folds
    time into the batch looks the same)."""
    rng = np.random.default_rng(0)
    arrays = {"W": rng.random((4, 1, 3, 3)), "W2": rng.random((4, 4, 1, 1)), "Wl": rng.random((4, 4))}
    inits = {k: v.astype(np.float32) for k, v in arrays.items()} | {"fold": np.array([-1, 4, 8, 8], np.int64)}
    ops = [("Conv", ["x", "W"], "y", {"pads": [1, 1, 1, 1]}), ("Relu", ["y"], "r", {}),
           ("Reshape", ["r", "fold"], "f", {}), ("Conv", ["f", "W2"], "c", {}),
           ("GlobalAveragePool", ["r"], "g", {}), ("Flatten", ["g"], "fl", {}),
           ("MatMul", ["fl", "Wl"], "logits", {})]  # fmt: skip
    return ops_model(path, ops, inits, ["N", 1, 16, 16], ["N", 4])


@pytest.mark.parametrize("reduce", ["graph", "native"])
def test_tap_whose_batch_is_folded_into_axis_0(tmp_path: Path, reduce: str) -> None:
    path = _folded_teacher(tmp_path / "folded.onnx")
    out = tmp_path / "c"
    r = _cache(path, train_data(), out, "--taps", "c", "--reduce", reduce)
    assert r.exit_code == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("kdpipe: error: ")]  # after the tap line
    assert errors == [r.stderr.strip().splitlines()[-1]], r.stderr
    assert "'c' gives 512 rows for an input batch of 128" in errors[0] and "--taps" in errors[0]
    assert not (out / fmt.COMPLETE).exists()
    with pytest.raises(KdpipeError, match="not complete|unfinished|incomplete"):
        kc.open(out)  # never trained on
    r = _cache(path, train_data(), tmp_path / "c2", "--taps", "r", "--reduce", reduce)
    assert r.exit_code == 0, r.stderr  # the batch-first tap of the same teacher caches


def test_unknown_card_key(tmp_path: Path) -> None:
    card = tmp_path / "card.yaml"
    card.write_text("input_size: 16\nscal: 1/255\n")
    _one_line(_cache(teacher(), train_data(), tmp_path / "c", "--card", str(card)), "unknown keys", "scal")


# ------------------------------------------------------------------------------------ data sets
def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("x")
    _one_line(_cache(teacher(), str(tmp_path / "empty"), tmp_path / "c"), "holds no images", "empty")


def test_unreadable_image_is_named_and_skip_bad_records_it(tmp_path: Path) -> None:
    root = _images(tmp_path / "imgs")
    (root / "class1" / "broken.png").write_bytes(b"not a png at all")
    good = (root / "class0" / "0.png").read_bytes()
    (root / "class0" / "truncated.png").write_bytes(good[: len(good) // 2])  # header fine, data cut
    _one_line(_cache(teacher(), str(root), tmp_path / "c"), "broken.png", "--skip-bad")
    r = run_ok(["cache-teacher", teacher(), "--data", str(root), "--out", str(tmp_path / "c2"),
                "--threads", "1", "--no-progress", "--skip-bad"])  # fmt: skip
    assert "left out 2 unreadable image(s)" in r.stderr
    manifest = json.loads((tmp_path / "c2" / "manifest.json").read_text())
    assert manifest["dataset"]["skipped"] == ["class0/truncated.png", "class1/broken.png"]
    assert manifest["num_samples"] == 6
    labels = np.load(tmp_path / "c2" / "shards" / "00000-of-00001" / "labels.npy")
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])
    # distill replays the same samples: it leaves out what the cache left out
    args = distill_args(tmp_path / "run", "--data", str(root), "--method", "kd", "--no-export",
                        "--max-steps", "1", cache_path=str(tmp_path / "c2"))  # fmt: skip
    _one_line(run_cli(args), "--batch-size 32", "6 samples")  # and a batch larger than the data is one line
    run_ok([*args, "--batch-size", "2"])


def test_labels_outside_the_teachers_classes(tmp_path: Path) -> None:
    data = tmp_path / "many.npz"
    np.savez(data, x=np.zeros((12, 16, 16), np.uint8), y=np.arange(12) % 6)  # teacher has 4 classes
    _one_line(_cache(teacher(), str(data), tmp_path / "c"), "6 classes", "4 logits")


def test_teacher_at_chance_is_warned(tmp_path: Path) -> None:
    data = tmp_path / "blank.npz"
    np.savez(data, x=np.zeros((16, 16, 16), np.uint8), y=np.arange(16) % 4)  # one prediction for all
    r = _cache(teacher(), str(data), tmp_path / "c")
    assert r.exit_code == 0, r.stderr
    top1 = kc.open(tmp_path / "c")
    pred = np.asarray(top1.array("logits")[:, 0]).argmax(1)
    acc = float((pred == np.arange(16) % 4).mean())  # recomputed from the stored logits
    assert acc <= 0.25
    assert "WARNING: the teacher's top-1 on these views is" in r.stderr and "at or below chance" in r.stderr


def test_inputs_the_preprocessing_cannot_shape(tmp_path: Path) -> None:
    five = tmp_path / "five.npz"
    np.savez(five, x=np.zeros((4, 16, 16, 5), np.uint8), y=np.arange(4))
    _one_line(_cache(teacher(), str(five), tmp_path / "c"), "five.npz", "C 1 or 3")
    card = tmp_path / "rgb.yaml"
    card.write_text("input_size: 16\nmean: [0.5, 0.5, 0.5]\nstd: [0.5, 0.5, 0.5]\n")
    _one_line(_cache(teacher(), train_data(), tmp_path / "c", "--card", str(card)), "rgb.yaml", "1 channel")
    _one_line(_cache(teacher(), train_data(), tmp_path / "c", "--input-size", "32"), "differs", "[16, 16]")


# ------------------------------------------------------------------------------- output folders
def test_output_folder_that_cannot_be_created(tmp_path: Path) -> None:
    _one_line(_cache(teacher(), train_data(), Path("/proc/kdpipe-cannot-exist")), "/proc/kdpipe-cannot-exist")
    (tmp_path / "file").write_text("x")
    _one_line(_cache(teacher(), train_data(), tmp_path / "file" / "c"), "--out")


def test_read_only_and_full_output_folders(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode().strip()[:80]}")
    try:
        _one_line(_cache(teacher(), train_data(), ro / "c"), "cannot write", "Read-only")
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True)
    try:
        _one_line(_cache(teacher(), train_data(), small / "c", "--views", "4"), "not enough disk space")
        assert not kc.info(small / "c")["complete"]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


# ----------------------------------------------------------------------------- caches and resume
def test_cache_from_another_format_version(tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(cached(2), old)
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 0
    (old / "manifest.json").write_text(json.dumps(fmt.seal({k: v for k, v in m.items() if k != "seal"})))
    r = run_cli(distill_args(tmp_path / "run", "--method", "kd", cache_path=str(old)))
    _one_line(r, "format version 0", "matching kdpipe version")


def test_cache_teacher_resume_with_other_options(tmp_path: Path) -> None:
    out = tmp_path / "c"
    assert _cache(teacher(), train_data(), out, "--views", "2").exit_code == 0
    _one_line(_cache(teacher(), train_data(), out, "--views", "3"), "num_views", "another --out")


# ---------------------------------------------------------------------------------------- --debug
def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    args = ["cache-teacher", str(tmp_path / "nope.onnx"), "--data", "digits", "--out", str(tmp_path / "c")]
    plain = subprocess.run([sys.executable, "-m", "kdpipe", *args], capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = subprocess.run([sys.executable, "-m", "kdpipe", "--debug", *args], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "KdpipeError" in debug.stderr
