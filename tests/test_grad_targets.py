"""`cache-teacher --targets grad`: J_T = d(sum_b CE)/du from the cache against independent references.

- Teachers from both torch exporters (dynamo=True, opset 18+, and dynamo=False, opset 17): the cached
  J_T equals torch.autograd on the original PyTorch model (float32, 1e-4 relative), on augmented views
  replayed from the stored view parameters, with a non-trivial mean/std (and BGR, and an NHWC model).
- The committed tf2onnx (NHWC) and paddle2onnx fixtures: the cached J_T equals a float64 replica's,
  whose logits equal the framework's own and whose gradient agrees with central finite differences.
- A teacher op onnx2torch cannot convert is one line naming the op and the node; a replica that
  disagrees with onnxruntime is one line naming the worst tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import _models as M
import numpy as np
import onnx
import pytest
import torch
from _foreign import fixture, flags
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from kdpipe.cli import cli
from kdpipe.data.views import ViewPolicy, apply_views
from kdpipe.errors import KdpipeError
from kdpipe.gradient import parse_form
from kdpipe.teacher import auto_taps, load_teacher, spec_for
from kdpipe.teacher.gradients import TeacherGradients
from kdpipe.teacher.replica import build_replica, check_replica

SHARD = Path("shards") / "00000-of-00001"
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _images(n: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


def _cache(tmp_path: Path, teacher: str, x: np.ndarray, y: np.ndarray, *flags: str) -> Path:
    data, out = tmp_path / "data.npz", tmp_path / "cache"
    tmp_path.mkdir(parents=True, exist_ok=True)
    np.savez(data, x=x, y=y)
    args = ["cache-teacher", teacher, "--data", str(data), "--out", str(out), "--targets", "logits,grad"]
    args += ["--grad-dtype", "float32", "--threads", "1", "--no-progress", "--batch-size", "5", *flags]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return out


def _stored(out: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest, np.load(out / SHARD / "grad.npy"), np.load(out / SHARD / "view_params.npy")


def _replayed(x: np.ndarray, params: np.ndarray, manifest: dict) -> np.ndarray:
    """The uint8 views (n*V, H, W, 3) the teacher saw, from the stored view parameters."""
    n, v = params.shape[:2]
    policy = ViewPolicy.from_dict(manifest["views"]["policy"])
    return apply_views(x[np.repeat(np.arange(n), v)], params.reshape(n * v, 5), policy)


def _close(got: np.ndarray, ref: np.ndarray, rel: float) -> None:
    """Equal to ``rel`` of the reference's scale, element by element and in norm."""
    scale = float(np.abs(ref).max())
    assert scale > 0
    np.testing.assert_allclose(got, ref, rtol=0, atol=rel * scale)
    assert np.linalg.norm(got - ref) <= rel * np.linalg.norm(ref)


def _torch_reference(name: str, views: np.ndarray, labels: np.ndarray, bgr: bool) -> np.ndarray:
    """dCE_sum/du of the original torch model, u = views / 255 (RGB NCHW), written out by hand."""
    mean, std = np.float32(MEAN), np.float32(STD)
    pix = views[..., ::-1] if bgr else views
    x = (pix.astype(np.float32) * np.float32(1 / 255) - mean) / std  # NHWC, the spec's float32 formula
    xt = torch.from_numpy(np.ascontiguousarray(x if name == "nhwc" else x.transpose(0, 3, 1, 2)))
    xt.requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(M.model(name)(xt), torch.from_numpy(labels), reduction="sum")
    (dx,) = torch.autograd.grad(ce, xt)
    dx = dx.numpy().astype(np.float64)
    dx = dx if name == "nhwc" else dx.transpose(0, 2, 3, 1)  # NHWC
    du = dx * (255 * (1 / 255)) / std.astype(np.float64)  # dx/du = 255 * scale / std, scale = 1/255
    du = du[..., ::-1] if bgr else du
    return np.ascontiguousarray(du.transpose(0, 3, 1, 2))


CASES = [("resnet", "dynamo", False), ("resnet", "legacy", True), ("wrn", "dynamo", True),
         ("nhwc", "legacy", False), ("nhwc", "dynamo", False)]  # fmt: skip


@pytest.mark.parametrize(("name", "exporter", "bgr"), CASES)
def test_cached_grad_equals_torch_autograd_of_the_original_model(tmp_path, name, exporter, bgr):
    x = _images(12, M.SIZE)
    y = (np.arange(12) * 7) % 5
    flags = ["--views", "2", "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]
    out = _cache(tmp_path, M.export(name, exporter, True), x, y, *flags, *(["--bgr"] if bgr else []))
    manifest, grad, params = _stored(out)
    assert manifest["arrays"]["grad"] == {"shape": [3, M.SIZE, M.SIZE], "dtype": "float32", "per": "view"}
    assert manifest["targets"]["grad"]["form"] == "full"
    views = _replayed(x, params, manifest)
    assert params[..., 4].any() and not params[..., 4].all()  # some views flipped, some not
    ref = _torch_reference(name, views, np.repeat(y, 2).astype(np.int64), bgr)
    _close(grad.reshape(ref.shape).astype(np.float64), ref, 1e-4)


def test_reduced_forms_are_the_full_gradient_reduced(tmp_path):
    x, y = _images(6, M.SIZE), np.arange(6) % 5
    teacher = M.export("resnet", "legacy", True)
    full = _stored(_cache(tmp_path / "f", teacher, x, y))[1]
    small = _stored(_cache(tmp_path / "s", teacher, x, y, "--grad-form", "csum+pool:4"))[1]
    assert small.shape == (6, 1, 1, 4, 4)
    ref = full.reshape(6, 3, 4, 2, 4, 2).sum(axis=1).mean(axis=(2, 4))  # channel sum, 2x2 area mean
    np.testing.assert_allclose(small.reshape(6, 4, 4), ref, rtol=1e-5, atol=1e-9)


# jax_vit_jax2onnx: opset 23 with Gelu-20 and Split-18, which the opset converter cannot bring to 17
FOREIGN = ["keras_resnet_tf2onnx", "paddle_resnet_paddle2onnx", "jax_vit_jax2onnx"]


@pytest.mark.parametrize("name", FOREIGN)
def test_foreign_teacher_grad_equals_a_float64_replica_checked_by_finite_differences(tmp_path, name):
    path, ref = fixture(name)
    n = len(ref["x"])
    labels = (np.arange(n) * 3) % 10
    grad = _stored(_cache(tmp_path, path, ref["x"], labels, *flags(ref), "--views", "0"))[1]
    grad = grad.reshape(n, 3, 32, 32)

    graph = load_teacher(path)
    spec = spec_for(graph, scale=float(ref["scale"]), mean=tuple(ref["mean"]), std=tuple(ref["std"]))
    x = spec.preprocess(ref["x"])  # the model input, in the model's layout (NHWC for tf2onnx)
    f64 = TeacherGradients(graph, [], spec, parse_form("full"), dtype=torch.float64)
    ref64 = f64(x, labels)
    _close(grad.astype(np.float64), ref64, 1e-4)
    with torch.no_grad():  # the float64 replica is the framework's model: its logits are the framework's
        logits = f64.replica(torch.from_numpy(x).double())["logits"].numpy()
    np.testing.assert_allclose(logits, ref["logits"], rtol=1e-5, atol=2e-5)

    # central finite differences of the float64 replica's loss along random directions of u
    def loss(u: np.ndarray) -> float:
        mean, std = (np.broadcast_to(ref[k], (3,)).reshape(1, 3, 1, 1) for k in ("mean", "std"))
        model_x = (u * 255 * float(ref["scale"]) - mean) / std
        if graph.input.layout == "NHWC":
            model_x = model_x.transpose(0, 2, 3, 1)
        with torch.no_grad():
            z = f64.replica(torch.from_numpy(np.ascontiguousarray(model_x)))["logits"]
        return float(torch.nn.functional.cross_entropy(z, torch.from_numpy(labels), reduction="sum"))

    u0 = ref["x"].astype(np.float64).transpose(0, 3, 1, 2) / 255
    rng = np.random.default_rng(0)
    for _ in range(2):
        d = rng.standard_normal(u0.shape)
        h = 1e-6
        fd = (loss(u0 + h * d) - loss(u0 - h * d)) / (2 * h)
        assert fd == pytest.approx(float((ref64 * d).sum()), rel=1e-5)


def _conv_head_model(middle: list, inits: list, name: str, opset: int) -> onnx.ModelProto:
    """image (B,3,8,8) -> Conv "w" -> ``middle`` (from "c" to "s") -> global pool -> Gemm "fc" -> 5 logits."""
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        *middle,
        helper.make_node("GlobalAveragePool", ["s"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1),
    ]
    g = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _shrink_teacher(path: Path) -> str:
    """Conv -> Shrink -> global pool -> Gemm: runs in onnxruntime, but onnx2torch has no Shrink."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc"),
    ]
    middle = [helper.make_node("Shrink", ["c"], ["s"], name="odd_shrink", lambd=0.5)]
    onnx.save(_conv_head_model(middle, inits, "shrink", 17), str(path))
    return str(path)


def test_an_unconvertible_op_is_one_line_naming_op_and_node(tmp_path):
    teacher = _shrink_teacher(tmp_path / "shrink.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=_images(4, 8), y=np.arange(4))
    args = ["cache-teacher", teacher, "--data", str(data), "--out", str(tmp_path / "c"), "--targets", "grad"]
    r = CliRunner().invoke(cli, [*args, "--no-progress", "--threads", "1"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdpipe: error: "), r.stderr
    assert "Shrink node 'odd_shrink'" in lines[0] and "opset 17" in lines[0], lines[0]
    assert "Traceback" not in r.output
    # the same teacher without grad caches fine: only the gradient needs the replica
    ok = CliRunner().invoke(cli, [*args[:-1], "logits", "--no-progress", "--threads", "1"])
    assert ok.exit_code == 0, ok.output


def test_a_replica_that_disagrees_with_onnxruntime_names_the_worst_tensor():
    graph = load_teacher(M.export("resnet", "legacy", True))
    taps = auto_taps(graph)
    replica = build_replica(graph, taps)
    x = M.sample_input("resnet", 3)
    assert check_replica(replica, graph, taps, x) < 1e-5
    last = [m for m in replica.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(1.5)  # the logits change, the taps do not
    with pytest.raises(KdpipeError, match=r"on the first batch: '[^']*logits[^']*' by") as e:
        check_replica(replica, graph, taps, x)
    assert "\n" not in str(e.value)


def test_an_empty_batch_gives_an_empty_gradient_and_leaves_the_check_to_the_first_real_one():
    # the replica was "checked" on the empty batch (onnxruntime failed on its Reshape to (0, -1))
    graph = load_teacher(M.export("resnet", "legacy", True))
    grads = TeacherGradients(graph, [], spec_for(graph), parse_form("csum+pool:4"))
    x = M.sample_input("resnet", 3)
    out = grads(x[:0], np.zeros(0, np.int64))
    assert out.shape == (0, 1, 4, 4) and out.dtype == np.float32 and grads.worst is None
    assert grads(x, np.arange(3)).shape == (3, 1, 4, 4) and grads.worst is not None and grads.worst < 1e-5


def test_weights_shared_through_identity_nodes_are_converted(tmp_path):
    # the legacy exporter shares equal initializers (here the zero biases of folded BNs) through
    # Identity nodes; onnx2torch reads Conv weights from initializers only, so kdpipe turns them into ones
    from _distill import export_quiet

    from kdpipe.student import create_model

    torch.manual_seed(0)
    path = export_quiet(
        create_model("resnet8", num_classes=3, in_chans=3), torch.zeros(2, 3, 8, 8), tmp_path / "t.onnx"
    )
    graph = load_teacher(str(path))
    assert any(n.op_type == "Identity" for n in graph.model.graph.node)
    taps = auto_taps(graph)
    assert check_replica(build_replica(graph, taps), graph, taps, M.sample_input("resnet", 2)) < 1e-5


@pytest.mark.parametrize(
    "name", ["keras_resnet_tf2onnx", "paddle_resnet_paddle2onnx", "jax_resnet_jax2onnx", "jax_vit_jax2onnx"]
)
def test_foreign_replicas_equal_onnxruntime_on_logits_and_taps(name):
    # jax2onnx: opset 23 (version_converter to 17) and Conv auto_pad SAME_UPPER (made explicit pads)
    path, ref = fixture(name)
    graph = load_teacher(path)
    taps = auto_taps(graph)
    spec = spec_for(graph, scale=float(ref["scale"]), mean=tuple(ref["mean"]), std=tuple(ref["std"]))
    assert check_replica(build_replica(graph, taps), graph, taps, spec.preprocess(ref["x"])) < 1e-5


def _small_job(tmp_path: Path) -> list[str]:
    """cache-teacher of the tiny ResNet over 4 images into tmp_path/c (targets still to add)."""
    data = tmp_path / "d.npz"
    np.savez(data, x=_images(4, M.SIZE), y=np.arange(4))
    teacher = M.export("resnet", "legacy", True)
    return ["cache-teacher", teacher, "--data", str(data), "--out", str(tmp_path / "c")]


@pytest.mark.parametrize(
    ("form", "words"),
    [("pool:0", "'pool:0' is not understood"), ("csum+csum", "'csum' is not understood"),
     ("pool:99", "larger than the 8x8 px input"), ("max", "'max' is not understood")],
)  # fmt: skip
def test_a_bad_grad_form_is_one_line(tmp_path, form, words):
    args = _small_job(tmp_path)
    r = CliRunner().invoke(cli, [*args, "--targets", "grad", "--grad-form", form, "--no-progress"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.output
    assert not (tmp_path / "c").exists()


def test_pool_is_checked_against_the_shorter_side():
    """A 12x8 (h x w) input: pool:10 would average over less than one pixel of width."""
    assert parse_form("pool:8", (12, 8)).pool == 8
    with pytest.raises(KdpipeError, match="larger than the 12x8 px input; use pool:8 or less"):
        parse_form("pool:10", (12, 8))


def test_estimate_counts_the_grad_bytes(tmp_path):
    args = _small_job(tmp_path)
    r = CliRunner().invoke(cli, [*args, "--targets", "logits,grad", "--estimate"])
    assert r.exit_code == 0, r.output
    assert "grad 384" in r.stdout and r.stdout.startswith("432 bytes per view"), (
        r.stdout
    )  # 3x8x8 float16 + the rest


def test_grad_goes_through_shards_resume_and_verify(tmp_path):
    # two shards written by separate commands read as the one-process cache, byte for byte; a chunk
    # whose journal line is lost is recomputed to the same bytes; cache verify checks grad's crc32
    x, y = _images(12, M.SIZE), np.arange(12) % 5
    teacher = M.export("resnet", "legacy", True)
    one = _cache(tmp_path / "one", teacher, x, y, "--views", "2", "--chunk-size", "3")
    ref = np.load(one / SHARD / "grad.npy")
    data, two = tmp_path / "one" / "data.npz", tmp_path / "two"
    for shard in ("0/2", "1/2"):
        args = ["cache-teacher", teacher, "--data", str(data), "--out", str(two), "--targets", "logits,grad"]
        args += ["--views", "2", "--chunk-size", "3", "--shard", shard, "--grad-dtype", "float32"]
        r = CliRunner().invoke(cli, [*args, "--threads", "1", "--no-progress", "--batch-size", "5"])
        assert r.exit_code == 0, r.output
    import kdpipe.cache as kc

    np.testing.assert_array_equal(np.asarray(kc.open(str(two)).array("grad")), ref)
    journal = one / SHARD / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:-1]))
    (one / SHARD / "COMPLETE.json").unlink()
    _cache(tmp_path / "one", teacher, x, y, "--views", "2", "--chunk-size", "3")  # resumes: the lost chunk
    np.testing.assert_array_equal(np.load(one / SHARD / "grad.npy"), ref)
    assert CliRunner().invoke(cli, ["cache", "verify", str(one)]).exit_code == 0
    with open(one / SHARD / "grad.npy", "r+b") as f:  # one flipped byte in grad is found
        f.seek(-3, 2)
        b = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    r = CliRunner().invoke(cli, ["cache", "verify", str(one)])
    assert r.exit_code != 0 and "grad" in r.output, r.output


def test_a_default_exporter_vit_teacher_gives_the_torch_input_gradient():
    # torch's default exporter writes nn.GELU as Gelu-20, which has no opset-17 form: the replica
    # writes it out as its erf formula before the opset conversion (it used to stop the job)
    import copy

    import _vit as V

    graph = load_teacher(V.export("dynamo", registers=2))
    assert any(n.op_type == "Gelu" for n in graph.model.graph.node)
    spec = spec_for(graph, scale=1 / 255, mean=(0.5,), std=(0.25,))
    x, y = spec.preprocess(V.images(3)), np.array([0, 3, 4])
    got = TeacherGradients(graph, auto_taps(graph), spec, parse_form("full"))(x, y)
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(
        copy.deepcopy(V.model(registers=2)).double()(xt), torch.from_numpy(y), reduction="sum"
    )
    (dx,) = torch.autograd.grad(ce, xt)
    _close(got.astype(np.float64), dx.numpy() * (255 * (1 / 255) / 0.25), 1e-4)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_20_is_written_out_exactly(tmp_path, approximate):
    # Conv -> Gelu (opset 20) -> global pool -> Gemm; float64 replica vs torch's own gelu in float64
    # (1e-5: the formula's constants are float32, as the teacher's; erf and tanh GELU differ by ~1e-3)
    rng = np.random.default_rng(0)
    w, fc = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal((5, 4))
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Gelu", ["c"], ["s"], name="gelu", approximate=approximate),
        helper.make_node("GlobalAveragePool", ["s"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((w, "w"), (fc, "fc"))]
    g = helper.make_graph(
        nodes,
        "gelu",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "gelu.onnx"))
    graph = load_teacher(str(tmp_path / "gelu.onnx"))
    spec = spec_for(graph, scale=1 / 255, mean=(0.5,), std=(0.25,))
    x, y = spec.preprocess(_images(4, 8)), np.arange(4)
    f64 = TeacherGradients(graph, [], spec, parse_form("full"), dtype=torch.float64)
    got = f64(x, y)
    assert f64.worst is not None and f64.worst < 1e-5

    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    c = torch.nn.functional.conv2d(xt, torch.from_numpy(w.astype(np.float32)).double(), padding=1)
    s = torch.nn.functional.gelu(c, approximate=approximate)
    z = s.mean(dim=(2, 3)) @ torch.from_numpy(fc.astype(np.float32)).double().T
    (dx,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(z, torch.from_numpy(y), reduction="sum"), xt
    )
    _close(got, dx.numpy() * (255 * (1 / 255) / 0.25), 1e-5)


def test_a_float16_teacher_gives_the_input_gradient_of_its_float32_counterpart(tmp_path):
    # onnxruntime refused the float32 check batch (a traceback), and the half replica could not run
    import contextlib
    import io
    import warnings

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).eval()
    path = str(tmp_path / "half.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.half(), (torch.zeros(2, 3, 16, 16, dtype=torch.half),), path, dynamo=False,
            opset_version=17, input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "b"}, "logits": {0: "b"}},
        )  # fmt: skip
    graph = load_teacher(path)
    assert graph.input.dtype == "float16"
    spec = spec_for(graph, scale=1 / 255, mean=(0.5,), std=(0.25,))
    x, y = spec.preprocess(_images(3, 16)), np.array([0, 2, 4])
    grads = TeacherGradients(graph, auto_taps(graph), spec, parse_form("full"))
    got = grads(x, y)
    assert got.dtype == np.float32 and grads.worst is not None and grads.worst < 1e-3
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)  # the rounded weights, in float64
    ce = torch.nn.functional.cross_entropy(net.double()(xt), torch.from_numpy(y), reduction="sum")
    (dx,) = torch.autograd.grad(ce, xt)
    _close(got.astype(np.float64), dx.numpy() * (255 * (1 / 255) / 0.25), 1e-5)


@pytest.mark.parametrize("sizes", [None, [2, 4, 1]])
def test_split_18_becomes_slices_of_the_right_sizes(tmp_path, sizes):
    # opset 18 Split, by num_outputs (7 channels -> 3, 3, 1) or by a sizes input; the outputs are
    # concatenated out of order, so a wrong size or order changes the logits that onnxruntime checks
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((7, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((5, 7)).astype(np.float32), "fc"),
    ]
    split_in, attrs = ["c"], {"axis": -3, "num_outputs": 3}
    if sizes is not None:
        inits.append(numpy_helper.from_array(np.asarray(sizes, np.int64), "sizes"))
        split_in, attrs = ["c", "sizes"], {"axis": 1}
    middle = [
        helper.make_node("Split", split_in, ["s0", "s1", "s2"], name="split", **attrs),
        helper.make_node("Concat", ["s2", "s0", "s1"], ["s"], name="cat", axis=1),
    ]
    onnx.save(_conv_head_model(middle, inits, "split", 18), str(tmp_path / "split.onnx"))
    graph = load_teacher(str(tmp_path / "split.onnx"))
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    assert check_replica(build_replica(graph, []), graph, [], x) < 1e-5
