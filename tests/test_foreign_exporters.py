"""Teachers from real non-torch exporters: a Keras ResNet via tf2onnx, a Flax (nnx) ResNet via jax2onnx,
a PaddlePaddle ResNet via paddle2onnx.

The ONNX files and the framework's own numbers live in ``tests/fixtures/`` (made by
``tests/fixtures/make_foreign_teachers.py`` in a separate venv with TensorFlow / JAX / Paddle; none is
needed here). The Keras and Flax models take NHWC float input ``uint8 / 255``; the Paddle model takes
NCHW float input ``(uint8 / 255 - mean) / std`` with ImageNet's mean and std. All have three residual
stages, at 32x32, 16x16 and 8x8 (a fourth, tiny Keras model: 4x4, 2x2, 1x1); each ``.npz`` holds 8
NHWC uint8 images, the framework's logits, its stage outputs (``act_i``, NHWC) and the preprocessing.

What the exporters write differs from torch's graphs: tf2onnx puts one Transpose after the NHWC input
and folds BN into the convs, so every tap is NCHW; jax2onnx keeps BatchNormalization nodes, leaves
the last stage NHWC between Transposes (so the auto taps mix layouts) and writes stale NHWC
``value_info`` on tensors it turned into NCHW, so plain onnxruntime refuses the file as written while
kdpipe (which re-infers shapes) loads it. On 1x1 maps tf2onnx leaves shape-preserving Reshapes where
it removed Transposes, so the residual Adds of the tiny model's 1x1 stage have a Reshape input.
paddle2onnx keeps NCHW and the BatchNormalization nodes and writes an Identity between every
residual Add and its ReLU (and before the logits output).

Every cached target is compared with float64 references computed from the framework's activations,
which also shows that ``--taps auto`` picked exactly the stage outputs (the ReLU after each stage's
last residual Add).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import _models as M
import numpy as np
import onnxruntime as ort
import pytest
from _foreign import fixture as _fixture
from _foreign import flags as _flags
from click.testing import CliRunner

from kdpipe.cli import cli
from kdpipe.teacher import auto_taps, load_teacher
from kdpipe.teacher.surgery import expose

BIG = [(8, 32, 32), (16, 16, 16), (32, 8, 8)]
KERAS_NAMES = ("stage1_1_out", "stage2_1_out", "stage3_1_out")
# the ReLU after each stage's last residual Add, as paddle2onnx names it (pd_op.relu.K: K-th ReLU)
PADDLE_NAMES = ("p2o.pd_op.relu.4.0", "p2o.pd_op.relu.8.0", "p2o.pd_op.relu.12.0")
# name -> (input layout, (C, H, W) of each stage output, layout of each auto tap,
#          a part of each tap's name or None)
TEACHERS = {
    "keras_resnet_tf2onnx": ("NHWC", BIG, ("NCHW",) * 3, KERAS_NAMES),
    "jax_resnet_jax2onnx": ("NHWC", BIG, ("NCHW", "NCHW", "NHWC"), None),
    "keras_tiny1x1_tf2onnx": ("NHWC", [(4, 4, 4), (8, 2, 2), (8, 1, 1)], ("NCHW",) * 3, KERAS_NAMES),
    "paddle_resnet_paddle2onnx": ("NCHW", BIG, ("NCHW",) * 3, PADDLE_NAMES),
}
NUM_CLASSES = 10
VARIANTS = M.DCT_VARIANTS
SHARD = Path("shards") / "00000-of-00001"


def _model_input(ref: dict[str, np.ndarray], layout: str) -> np.ndarray:
    """The float32 input the framework saw, in the model's layout: ``(x / 255 - mean) / std`` computed in
    float64 and rounded once to float32 (the generator's preprocessing, written again here)."""
    assert float(ref["scale"]) == pytest.approx(1 / 255)
    assert ref["mean"].shape in ((1,), (3,)) and ref["std"].shape == ref["mean"].shape
    x = (ref["x"].astype(np.float64) / 255.0 - ref["mean"].astype(np.float64)) / ref["std"].astype(np.float64)
    x = x.astype(np.float32)  # NHWC, like the stored images
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "NCHW" else x


@pytest.mark.parametrize("name", list(TEACHERS))
def test_inspect_shows_the_input_layout_and_three_stage_taps(name):
    path, ref = _fixture(name)
    layout, shapes, layouts, parts = TEACHERS[name]
    r = CliRunner().invoke(cli, ["inspect", path])
    assert r.exit_code == 0, r.output
    text = r.stdout
    size = ref["x"].shape[1]
    shape = f"3, {size}, {size}" if layout == "NCHW" else f"{size}, {size}, 3"
    assert re.search(rf"^input:\s+image\s+layout {layout}\s+shape \(batch, {shape}\)", text, re.M), text
    assert re.search(r"^\s+\S+\s+\(batch, 10\)\s+<- logits$", text, re.M), text
    auto = text.split("auto taps, by depth:\n", 1)[1].splitlines()
    rows = [line.split() for line in auto if re.match(r"^\s+\d+: ", line)]
    assert [r[2] for r in rows] == ["x".join(map(str, s)) for s in shapes], auto
    assert [r[3] for r in rows] == list(layouts), auto
    starred = [line.split()[1] for line in text.splitlines() if line.startswith("  *")]
    assert starred == [r[1] for r in rows]
    if parts is not None:
        assert all(p in r[1] for p, r in zip(parts, rows, strict=True)), rows


@pytest.mark.parametrize("name", list(TEACHERS))
def test_auto_taps_are_the_framework_stage_outputs(name):
    """The raw auto-tap tensors (kdpipe's loaded graph, plain onnxruntime) equal the framework's own
    stage activations once the tap's channel axis is moved to NHWC; the logits equal its logits."""
    path, ref = _fixture(name)
    layout, shapes, layouts, _ = TEACHERS[name]
    graph = load_teacher(path)
    assert (graph.input.layout, graph.input.batch, graph.num_classes) == (layout, None, NUM_CLASSES)
    assert graph.batch_message is None
    taps = auto_taps(graph)
    assert [t.shape for t in taps] == shapes
    assert [t.layout for t in taps] == list(layouts)
    assert [t.op_type for t in taps] == ["Relu"] * 3
    model = expose(graph.model, [t.name for t in taps], graph.elem_types)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {graph.input.name: _model_input(ref, layout)}
    got = sess.run([graph.logits_name, *(t.name for t in taps)], feed)
    np.testing.assert_allclose(got[0], ref["logits"], rtol=1e-5, atol=2e-5)
    for i, (tap, act) in enumerate(zip(taps, got[1:], strict=True)):
        nhwc = np.moveaxis(act, tap.channel_axis, 3)
        np.testing.assert_allclose(nhwc, ref[f"act_{i}"], rtol=1e-5, atol=2e-5, err_msg=tap.name)


def _references(ref: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
    """Every cache array for the plain view, in float64, from the framework's logits and activations."""
    n = len(labels)
    out = {"labels": labels, "logits": ref["logits"].astype(np.float64).reshape(n, 1, -1)}
    for i in range(3):
        act = ref[f"act_{i}"]
        with np.errstate(invalid="ignore"):  # 0/0 in the DCT of a 1x1 map, replaced below
            targets = M.reference_targets(act, axis=3)
        for key, val in targets.items():
            if key.startswith("dct") and act.shape[1:3] == (1, 1):
                val = np.zeros_like(val)  # a constant (1x1) map: all zero by definition (kdpipe.ops)
            out[f"{key}.{i}"] = val.reshape(n, 1, *val.shape[1:])
    return out


@pytest.mark.parametrize(
    ("name", "reduce", "dtype", "batch"),
    [
        ("keras_resnet_tf2onnx", "graph", "float16", 256),
        ("keras_resnet_tf2onnx", "native", "float32", 3),
        ("jax_resnet_jax2onnx", "graph", "float32", 3),
        ("jax_resnet_jax2onnx", "native", "float16", 256),
        ("keras_tiny1x1_tf2onnx", "graph", "float32", 5),
        ("keras_tiny1x1_tf2onnx", "native", "float16", 256),
        *[
            ("paddle_resnet_paddle2onnx", reduce, dtype, batch)
            for reduce in ("graph", "native")
            for dtype in ("float16", "float32")
            for batch in (256, 3)
        ],
    ],
)
def test_cache_teacher_targets_match_the_framework(tmp_path, name, reduce, dtype, batch):
    path, ref = _fixture(name)
    n = len(ref["x"])
    labels = (np.arange(n) * 3) % NUM_CLASSES
    data = tmp_path / "data.npz"
    np.savez(data, x=ref["x"], y=labels)
    out = tmp_path / "cache"
    args = ["cache-teacher", path, "--data", str(data), "--out", str(out), "--taps", "auto", *_flags(ref)]
    args += ["--views", "0", "--reduce", reduce, "--dtype", dtype, "--batch-size", str(batch)]
    args += ["--dct-variant", ",".join(VARIANTS), "--threads", "1", "--no-progress"]
    args += ["--targets", "logits,at,dct,pooled", "--vec-dtype", "float32"]  # every kind, checked below
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output

    manifest = json.loads((out / "manifest.json").read_text())
    teacher = manifest["teacher"]
    layout, shapes, layouts, parts = TEACHERS[name]
    assert teacher["input"]["layout"] == layout and teacher["spec"]["normalize"]["layout"] == layout
    taps = manifest["taps"]
    assert [tuple(t["shape"]) for t in taps] == shapes
    assert [t["layout"] for t in taps] == list(layouts)
    if parts is not None:
        assert all(p in t["name"] for p, t in zip(parts, taps, strict=True)), [t["name"] for t in taps]
    expected = _references(ref, labels)
    arrays = [a for a in manifest["arrays"] if a != "view_params"]
    assert sorted(arrays) == sorted(expected)
    for a in arrays:
        meta = manifest["arrays"][a]
        got = np.load(out / SHARD / f"{a}.npy")
        if not meta["dtype"].startswith("float"):
            np.testing.assert_array_equal(got, expected[a], err_msg=a)
            continue
        got = got.astype(np.float64)
        assert got.shape == expected[a].shape, a
        if meta["dtype"] == "float16":
            np.testing.assert_allclose(got, expected[a], rtol=1e-3, atol=1e-4, err_msg=a)
        else:
            np.testing.assert_allclose(got, expected[a], rtol=1e-5, atol=2e-5, err_msg=a)
