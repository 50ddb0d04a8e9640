"""Teacher loading and tap selection on tiny torch exports, checked against forward-hook activations."""

from __future__ import annotations

import _models as M
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from kdpipe.errors import KdpipeError
from kdpipe.teacher import auto_taps, inspect_report, load_teacher, resolve_taps

CASES = [
    ("resnet", "legacy", True),
    ("resnet", "legacy", False),
    ("resnet", "dynamo", True),
    ("resnet", "dynamo", False),
    ("wrn", "legacy", True),
    ("wrn", "legacy", False),
    ("wrn", "dynamo", True),
    ("nhwc", "legacy", True),
    ("nhwc", "legacy", False),
    ("nhwc", "dynamo", True),
]
IDS = [f"{n}-{e}-{'dyn' if d else 'b1'}" for n, e, d in CASES]

MODULE_PATHS = {
    "resnet": ["layer1.0", "layer1.1.relu", "layer2.0.downsample", "layer3"],
    "wrn": ["block1.0", "block2.1.relu2", "block3.0.shortcut", "block3"],
    "nhwc": ["act", "res", "mlp.0", "mlp.1.act"],
}


def _activations(path: str, names: list[str], x):
    """Run the ONNX file with ``names`` as extra outputs (plain onnxruntime, independent of kdpipe)."""
    m = onnx.load(path)
    for n in names:
        m.graph.output.append(helper.make_empty_tensor_value_info(n))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(names, {"image": x})


@pytest.mark.parametrize(("name", "exporter", "dynamic"), CASES, ids=IDS)
def test_auto_picks_stage_outputs(name, exporter, dynamic):
    path = M.export(name, exporter, dynamic)
    graph = load_teacher(path)
    taps = auto_taps(graph)
    stages = M.MODELS[name].STAGES
    assert len(taps) == len(stages)
    x = M.sample_input(name, 3 if dynamic else 1, seed=3)
    _, ref = M.hooked(name, x, [p for p, _ in stages])
    got = _activations(path, [t.name for t in taps], x)
    for tap, (_, axis), r, g in zip(taps, stages, ref, got, strict=True):
        assert tap.channel_axis == axis
        assert g.shape == r.shape
        assert abs(g - r).max() < 1e-5
        c = r.shape[axis]
        h, w = (r.shape[2], r.shape[3]) if axis == 1 else (r.shape[1], r.shape[2])
        assert tap.shape == (c, h, w)
    assert sorted(t.name for t in taps) == sorted(c.name for c in graph.taps_candidates() if c.auto)
    # depth order: resolution from high to low
    assert [t.shape[1] for t in taps] == sorted((t.shape[1] for t in taps), reverse=True)


@pytest.mark.parametrize(
    ("name", "exporter", "dynamic"), [c for c in CASES if c[2]], ids=[i for i in IDS if i.endswith("-dyn")]
)
def test_module_paths_resolve_to_module_outputs(name, exporter, dynamic):
    path = M.export(name, exporter, dynamic)
    graph = load_teacher(path)
    paths = MODULE_PATHS[name]
    taps = resolve_taps(graph, ",".join(paths))
    assert [t.module_path is not None for t in taps] == [True] * len(paths)
    x = M.sample_input(name, 2, seed=4)
    _, ref = M.hooked(name, x, paths)
    got = _activations(path, [t.name for t in taps], x)
    for r, g in zip(ref, got, strict=True):
        assert g.shape == r.shape
        assert abs(g - r).max() < 1e-5


def test_tensor_names_and_regex():
    graph = load_teacher(M.export("wrn", "legacy", True))
    auto = auto_taps(graph)
    by_name = resolve_taps(graph, [t.name for t in auto])
    assert [t.name for t in by_name] == [t.name for t in auto]
    by_re = resolve_taps(graph, r"re:block\d")
    assert [t.name for t in by_re] == [t.name for t in auto]
    assert [t.name for t in resolve_taps(graph, "auto")] == [t.name for t in auto]


def test_unknown_tap_lists_close_matches():
    graph = load_teacher(M.export("resnet", "dynamo", True))
    with pytest.raises(KdpipeError, match="layer1") as e:
        resolve_taps(graph, "layer5")
    assert "\n" not in str(e.value)
    with pytest.raises(KdpipeError, match="relu_4"):
        resolve_taps(graph, "relu_44")
    with pytest.raises(KdpipeError, match="not a 4-D"):
        resolve_taps(graph, "fc")
    with pytest.raises(KdpipeError, match="matches no"):
        resolve_taps(graph, "re:nothing.*here")


def test_batch_handling():
    dyn = load_teacher(M.export("resnet", "legacy", True))
    assert dyn.input.batch is None and dyn.batch_message is None
    fixed = load_teacher(M.export("resnet", "legacy", False))  # Reshape to [1, -1] baked in
    assert (
        fixed.input.batch == 1 and fixed.fixed_batch and "one sample at a time" in (fixed.batch_message or "")
    )
    freed = load_teacher(M.export("wrn", "legacy", False))
    assert freed.input.batch is None and "made it symbolic" in (freed.batch_message or "")
    sess = ort.InferenceSession(freed.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(["logits"], {"image": M.sample_input("wrn", 4)})
    assert y.shape == (4, 5)


def test_input_and_logits():
    g = load_teacher(M.export("nhwc", "dynamo", True))
    assert (g.input.name, g.input.layout, g.input.channels, g.input.height, g.input.width) == (
        "image",
        "NHWC",
        3,
        8,
        8,
    )
    assert g.input.dtype == "float32" and g.logits_name == "logits" and g.num_classes == 5
    g = load_teacher(M.export("resnet", "legacy", True))
    assert g.input.layout == "NCHW" and g.input.shape == ("batch", 3, 8, 8)


def test_inspect_report_lists_input_outputs_and_auto():
    graph = load_teacher(M.export("nhwc", "legacy", True))
    text = inspect_report(graph)
    assert "image" in text and "NHWC" in text and "logits" in text
    for t in auto_taps(graph):
        assert any(line.lstrip().startswith("*") and t.name in line for line in text.splitlines())
    assert "mlp" in text


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def test_bad_files(tmp_path):
    good = M.export("resnet", "legacy", True)
    with pytest.raises(KdpipeError, match="does not exist"):
        load_teacher(str(tmp_path / "missing.onnx"))
    data = open(good, "rb").read()
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(KdpipeError):
        load_teacher(str(trunc))
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a model\n" * 10)
    with pytest.raises(KdpipeError):
        load_teacher(str(junk))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(KdpipeError):
        load_teacher(str(empty))

    m = onnx.load(good)
    m.opset_import[0].version = 99
    with pytest.raises(KdpipeError, match="opset 99"):
        load_teacher(_save(m, tmp_path / "opset.onnx"))

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 10])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 10])
    flat = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "flat", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    with pytest.raises(KdpipeError, match="no image-like 4-D input"):
        load_teacher(_save(flat, tmp_path / "flat.onnx"))

    x4 = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])
    y4 = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])
    nologits = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "nl", [x4], [y4]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    with pytest.raises(KdpipeError, match="logits"):
        load_teacher(_save(nologits, tmp_path / "nologits.onnx"))


@pytest.mark.filterwarnings("ignore")
def test_plain_cnn_fallback_takes_last_activation_per_resolution(tmp_path):
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    ).eval()
    path = str(tmp_path / "plain.onnx")
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, 8, 8),),
        path,
        dynamo=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "b"}, "logits": {0: "b"}},
    )
    taps = auto_taps(load_teacher(path))
    x = M.sample_input("resnet", 2, seed=5)
    acts = {}
    hooks = [
        net[i].register_forward_hook(lambda _m, _i, o, i=i: acts.__setitem__(i, o.numpy())) for i in (3, 6)
    ]
    with torch.no_grad():
        net(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    got = _activations(path, [t.name for t in taps], x)
    assert len(got) == 2
    for g, i in zip(got, (3, 6), strict=True):
        assert abs(g - acts[i]).max() < 1e-6


def test_shapes_completed_by_a_dummy_run_are_batch_first_or_left_unknown(tmp_path):
    """A graph whose Reshape shape is computed at run time: (1, B, 256), batch at axis 1, then its
    transpose (B, 1, 256). Every (None, ...) shape load_teacher records must hold at batch 3
    (onnxruntime, every tensor an output); the sequence-first tensor is never recorded batch-first."""
    import numpy as np
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    consts = {"W": rng.random((4, 3, 3, 3)), "Wl": rng.random((256, 5)), "zero": np.array(0),
              "ax": np.array([0]), "one": np.array([1]), "m1": np.array([-1]),
              "flat": np.array([0, -1])}  # fmt: skip
    inits = {k: v.astype(np.float32 if k[0] == "W" else np.int64) for k, v in consts.items()}
    ops = [("Conv", ["x", "W"], "y", {"pads": [1, 1, 1, 1]}), ("Relu", ["y"], "r", {}),
           ("Shape", ["r"], "s", {}), ("Gather", ["s", "zero"], "b", {"axis": 0}),
           ("Unsqueeze", ["b", "ax"], "b1", {}), ("Concat", ["one", "b1", "m1"], "newshape", {"axis": 0}),
           ("Reshape", ["r", "newshape"], "t", {}), ("Transpose", ["t"], "tt", {"perm": [1, 0, 2]}),
           ("Reshape", ["tt", "flat"], "f", {}), ("MatMul", ["f", "Wl"], "logits", {})]  # fmt: skip
    path = tmp_path / "seq_first.onnx"
    M.ops_model(path, ops, inits, ["N", 3, 8, 8], ["N", 5])
    g = load_teacher(str(path))
    names = ["y", "r", "t", "tt", "f", "logits"]
    m = onnx.load(path)
    m.graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n != "logits"
    )
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    real = dict(zip(names, sess.run(names, {"x": rng.random((3, 3, 8, 8)).astype(np.float32)}), strict=True))
    batch_first = [n for n in names if g.shapes.get(n) is not None and g.shapes[n][0] is None]
    assert set(batch_first) == {"y", "r", "tt", "f", "logits"}
    for n in batch_first:
        assert (3, *g.shapes[n][1:]) == real[n].shape, n
    assert g.shapes.get("t") is None or g.shapes["t"][0] == 1  # (1, B, 256): the batch is not axis 0
