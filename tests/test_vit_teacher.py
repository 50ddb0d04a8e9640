"""Transformer teachers: tap discovery on ViT graphs from both torch exporters, and cached targets on the
patch grid against float64 references computed from the PyTorch token activations (``tests/_vit.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import _models as M
import _vit as V
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper

from kdpipe.cli import cli
from kdpipe.errors import KdpipeError
from kdpipe.teacher import TeacherRunner, auto_taps, load_teacher, resolve_taps

EXPORTERS = ("legacy", "dynamo")
GRID = (V.GRID, V.GRID)
SHARD = Path("shards") / "00000-of-00001"
# (extra tokens, registers, patchify) -> index of the first patch token
VARIANTS = {(1, 0, "conv"): 1, (2, 0, "conv"): 2, (0, 0, "conv"): 0, (1, 2, "conv"): 3, (1, 0, "reshape"): 1}
# every variant from the legacy exporter, two from dynamo (3-4 s per dynamo export)
DISCOVERY = [("legacy", v) for v in VARIANTS] + [("dynamo", v) for v in list(VARIANTS)[:2]]


def _nchw(x: np.ndarray) -> np.ndarray:
    """uint8 NHWC images -> the teacher's float32 NCHW input (x / 255, kdpipe's default preprocessing)."""
    return np.ascontiguousarray((x.astype(np.float64) / 255.0).astype(np.float32).transpose(0, 3, 1, 2))


def _outputs(path: str, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    """Tensors ``names`` of the ONNX file on input x (plain onnxruntime, independent of kdpipe)."""
    m = onnx.load(path)
    for n in names:
        m.graph.output.append(helper.make_empty_tensor_value_info(n))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(names, {"image": x})


@pytest.mark.parametrize(
    ("exporter", "variant"), DISCOVERY, ids=[f"{e}-{v[0]}-{v[1]}-{v[2]}" for e, v in DISCOVERY]
)
def test_auto_picks_every_block_output(exporter, variant):
    path = V.export(exporter, *variant)
    graph = load_teacher(path)
    taps = auto_taps(graph)
    start = VARIANTS[variant]
    assert [t.block for t in taps] == list(range(1, V.DEPTH + 1))
    for t in taps:
        assert (t.layout, t.channel_axis, t.shape, t.token_start, t.op_type) == ("NLC", 2, (V.DIM, *GRID),
                                                                                start, "Add")  # fmt: skip
        assert t.tokens == V.GRID**2 + variant[0] + variant[1] and t.softmax
    x = _nchw(V.images(3, seed=1))
    _, ref, soft = V.tokens_and_softmax(x, *variant)
    got = _outputs(path, [t.name for t in taps] + [t.softmax for t in taps], x)  # type: ignore[misc]
    for r, g in zip(ref + soft, got, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    assert [c.name for c in graph.taps_candidates() if c.auto] == [t.name for t in taps]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_blocks_spec_and_module_paths(exporter):
    graph = load_teacher(V.export(exporter))
    auto = auto_taps(graph)
    assert [t.name for t in resolve_taps(graph, "blocks:2,4,6")] == [auto[i].name for i in (1, 3, 5)]
    assert [t.name for t in resolve_taps(graph, ["blocks:2", "4", "-1"])] == [auto[i].name for i in (1, 3, 5)]
    assert [t.name for t in resolve_taps(graph, "blocks")] == [t.name for t in auto]
    assert [t.name for t in resolve_taps(graph, "blocks.2,blocks.3")] == [auto[2].name, auto[3].name]
    for bad, words in (("blocks:7", "has 6 blocks"), ("blocks:0", "numbered 1..6"), ("blocks:x", "1..6")):
        with pytest.raises(KdpipeError, match=words) as e:
            resolve_taps(graph, bad)
        assert "\n" not in str(e.value)
    with pytest.raises(KdpipeError, match="no transformer blocks"):
        resolve_taps(load_teacher(M.export("resnet", "legacy", True)), "blocks:1")


def test_evenly_spaced_pairs_round_halves_up_in_exact_arithmetic():
    """Against Fractions: (j+1)*count/k to the nearest integer, halves up, minus 1."""
    from fractions import Fraction

    from kdpipe.pairing import evenly_spaced, pair_indices

    for count in range(1, 60):
        for k in range(1, count + 1):
            ref = [int(Fraction((j + 1) * count, k) + Fraction(1, 2)) - 1 for j in range(k)]
            assert evenly_spaced(count, k) == ref, (count, k)
    assert evenly_spaced(12, 8) == [1, 2, 4, 5, 7, 8, 10, 11]  # 1.5 -> 2, 4.5 -> 5, 7.5 -> 8, 10.5 -> 11
    assert pair_indices(3, 12) == ([0, 1, 2], [3, 7, 11])


def test_malformed_numbers_in_tap_specs_are_one_line():
    # "--2" and "²" once passed the digit check and raised int()'s ValueError (a traceback)
    from kdpipe.pairing import select_cached

    graph = load_teacher(V.export("legacy"))
    cached = [{"name": "a", "block": 2}, {"name": "b", "block": 4}, {"name": "c", "block": 6}]
    for bad in ("blocks:--2", "blocks:+2", "blocks:1_0", "blocks:\u00b2"):
        with pytest.raises(KdpipeError, match="is not a block number") as e:
            resolve_taps(graph, bad)
        assert "\n" not in str(e.value)
        with pytest.raises(KdpipeError, match="is not a block number"):
            select_cached(cached, bad, "the cache")
    for bad in ("--1", "+1", "1_0", "\u00b2"):
        with pytest.raises(KdpipeError, match="is not a tap of the cache"):
            select_cached(cached, bad, "the cache")
    assert select_cached(cached, "-1,0,blocks:2,-1", "the cache") == [2, 0, 0, 2]  # still understood
    for empty in ("", " , ", []):  # an empty choice was [] (no pairs at all)
        with pytest.raises(KdpipeError, match="names no taps"):
            select_cached(cached, empty, "the cache")


def test_inspect_shows_tokens_and_blocks():
    r = CliRunner().invoke(cli, ["inspect", V.export("dynamo", 2)])
    assert r.exit_code == 0, r.output
    assert "transformer: 6 blocks" in r.stdout and "66 tokens" in r.stdout and "8x8" in r.stdout
    auto = r.stdout.split("auto taps, by depth:\n", 1)[1].splitlines()
    assert sum(" NLC " in line and "block" in line for line in auto) == V.DEPTH


def _references(toks: list[np.ndarray], soft: list[np.ndarray], start: int, logits: np.ndarray) -> dict:
    """Every cache array of the plain view, float64, from the torch block outputs and softmaxes."""
    n = len(logits)
    out = {"logits": logits.astype(np.float64).reshape(n, 1, -1)}
    for i, (t, s) in enumerate(zip(toks, soft, strict=True)):
        ref = V.reference_targets(t, start, GRID)
        grid = t[:, start : start + V.GRID**2].reshape(n, *GRID, V.DIM)
        dct = M.reference_targets(grid, axis=3)  # the DCT variants of the same map (numpy / scipy FFTs)
        maps = {"at": ref["at"], "pooled": ref["pooled"], "attn": V.reference_attn(s, start, GRID)}
        maps |= {k: v for k, v in dct.items() if k.startswith("dct.")}
        out |= {f"{k}.{i}": v.reshape(n, 1, *v.shape[1:]) for k, v in maps.items()}
    return out


@pytest.mark.parametrize(
    ("exporter", "variant", "reduce", "dtype"),
    [
        ("legacy", (1, 0, "conv"), "graph", "float32"),
        ("legacy", (1, 2, "conv"), "native", "float16"),
        ("dynamo", (1, 0, "conv"), "native", "float32"),
        ("dynamo", (2, 0, "conv"), "graph", "float16"),
    ],
)
def test_cached_targets_equal_float64_references(tmp_path, exporter, variant, reduce, dtype):
    x = V.images(6, seed=2)
    labels = np.arange(6) % V.CLASSES
    np.savez(tmp_path / "data.npz", x=x, y=labels)
    out = tmp_path / "cache"
    args = ["cache-teacher", V.export(exporter, *variant), "--data", str(tmp_path / "data.npz")]
    args += [
        "--out",
        str(out),
        "--views",
        "0",
        "--reduce",
        reduce,
        "--dtype",
        dtype,
        "--vec-dtype",
        "float32",
    ]
    args += ["--targets", "logits,at,dct,pooled,attn", "--dct-variant", ",".join(M.DCT_VARIANTS)]
    args += ["--threads", "1", "--no-progress"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    start = VARIANTS[variant]
    assert [(t["layout"], t["block"], t["token_start"]) for t in manifest["taps"]] == [
        ("NLC", b, start) for b in range(1, V.DEPTH + 1)
    ]
    logits, toks, soft = V.tokens_and_softmax(_nchw(x), *variant)
    expected = _references(toks, soft, start, logits)
    assert sorted(a for a in manifest["arrays"] if a not in ("labels", "view_params")) == sorted(expected)
    tol = dict(rtol=1e-3, atol=2e-4) if dtype == "float16" else dict(rtol=1e-5, atol=2e-5)
    for name, ref in expected.items():
        got = np.load(out / SHARD / f"{name}.npy").astype(np.float64)
        assert got.shape == ref.shape, name
        t = tol if name.split(".")[0] in ("at", "dct", "attn") else dict(rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(got, ref, err_msg=name, **t)  # type: ignore[arg-type]


@pytest.mark.parametrize("reduce", ["graph", "native"])
def test_the_token_tensor_never_leaves_onnxruntime(reduce):
    graph = load_teacher(V.export("legacy"))
    taps = auto_taps(graph)
    runner = TeacherRunner(graph, taps, None, {"logits", "at", "pooled", "attn"}, provider="cpu",
                           threads=1, reduce=reduce)  # fmt: skip
    outs = {o.name for o in runner.session.get_outputs()}
    assert not outs & {t.name for t in taps} and not outs & {t.softmax for t in taps}
    got = runner.run(_nchw(V.images(2)))
    assert {got[f"at.{i}"].shape for i in range(V.DEPTH)} == {(2, *GRID)}
    assert {got[f"attn.{i}"].shape for i in range(V.DEPTH)} == {(2, *GRID)}
    assert {got[f"pooled.{i}"].shape for i in range(V.DEPTH)} == {(2, V.DIM)}


def test_attn_needs_a_transformer_block_with_a_class_token(tmp_path):
    np.savez(tmp_path / "d.npz", x=V.images(2), y=np.zeros(2, np.int64))
    cnn = M.export("resnet", "legacy", True)
    np.savez(tmp_path / "c.npz", x=np.zeros((2, M.SIZE, M.SIZE, 3), np.uint8), y=np.zeros(2, np.int64))
    for teacher, data, words in (
        (cnn, "c.npz", "is not a transformer block output"),
        (V.export("legacy", 0), "d.npz", "has no class token"),
    ):
        args = ["cache-teacher", teacher, "--data", str(tmp_path / data), "--out", str(tmp_path / "o"),
                "--targets", "logits,attn", "--no-progress"]  # fmt: skip
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2, r.output
        assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "o").exists()  # refused before anything was written


def _clipped(at: np.ndarray, q: float) -> np.ndarray:
    """float64 reference of --token-clip: each map clipped at its ceil(q*N)-th smallest cell, then l2n."""
    flat = at.reshape(len(at), -1)
    thr = np.sort(flat, axis=1)[:, int(np.ceil(q * flat.shape[1])) - 1]
    c = np.minimum(flat, thr[:, None])
    return (c / np.linalg.norm(c, axis=1, keepdims=True)).reshape(at.shape)


@pytest.mark.parametrize("reduce", ["graph", "native"])
def test_token_clip_clips_the_maps_and_their_dct(tmp_path, reduce):
    x = V.images(4, seed=5)
    np.savez(tmp_path / "data.npz", x=x, y=np.zeros(4, np.int64))
    out = tmp_path / "cache"
    args = ["cache-teacher", V.export("legacy"), "--data", str(tmp_path / "data.npz"), "--out", str(out)]
    args += [
        "--views",
        "0",
        "--reduce",
        reduce,
        "--dtype",
        "float32",
        "--targets",
        "at,dct",
        "--threads",
        "1",
    ]
    r = CliRunner().invoke(cli, [*args, "--token-clip", "0.75", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["targets"]["at"]["token_clip"] == 0.75
    _, toks, _ = V.tokens_and_softmax(_nchw(x))
    for i, t in enumerate(toks):
        at = _clipped(V.reference_targets(t, 1, GRID)["at"], 0.75)
        got = np.load(out / SHARD / f"at.{i}.npy")[:, 0]
        np.testing.assert_allclose(got, at, rtol=1e-5, atol=1e-6)
        assert (got == got.max(axis=(1, 2), keepdims=True)).sum() >= 16  # the top quarter is flat
        ref = M.reference_targets(np.sqrt(at)[..., None], axis=3)["dct.dft-abs"]  # the DCT of the clipped map
        np.testing.assert_allclose(
            np.load(out / SHARD / f"dct.dft-abs.{i}.npy")[:, 0], ref, rtol=1e-4, atol=1e-5
        )
    bad = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "bad"), "--token-clip", "1.5"])
    assert bad.exit_code == 2 and "between 0 and 1" in bad.stderr and not (tmp_path / "bad").exists()


def test_cache_verify_live_on_a_clipped_vit_cache(tmp_path):
    np.savez(tmp_path / "data.npz", x=V.images(6, seed=7), y=np.arange(6) % V.CLASSES)
    out = tmp_path / "cache"
    args = ["cache-teacher", V.export("legacy"), "--data", str(tmp_path / "data.npz"), "--out", str(out)]
    args += ["--views", "2", "--targets", "logits,at,dct,pooled,attn", "--token-clip", "0.9", "--no-progress"]
    assert CliRunner().invoke(cli, [*args, "--threads", "1"]).exit_code == 0
    r = CliRunner().invoke(cli, ["cache", "verify", str(out), "--live", "5"])
    assert r.exit_code == 0, r.output
    assert "attn" in r.output and "at" in r.output


@pytest.mark.parametrize("exporter", ["legacy"])  # the dynamo graph of the same blocks: tests above
def test_a_hybrid_teacher_gives_its_conv_stage_then_its_blocks(exporter):
    graph = load_teacher(V.export(exporter, 1, 0, "hybrid"))
    taps = auto_taps(graph)
    assert [(t.layout, t.shape, t.block) for t in taps] == [("NCHW", (8, 32, 32), 0)] + [
        ("NLC", (V.DIM, *GRID), b) for b in range(1, V.DEPTH + 1)
    ]
    x = _nchw(V.images(2, seed=4))
    _, ref, _ = V.tokens_and_softmax(x, 1, 0, "hybrid")
    got = _outputs(V.export(exporter, 1, 0, "hybrid"), [t.name for t in taps[1:]], x)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_token_clip_takes_the_nearest_rank_of_the_decimal_quantile():
    # the ceil(Q*N)-th smallest cell: Q = 0.55, N = 100 is the 55th (float 0.55 * 100 rounds up to
    # 55.000000000000007, whose ceil was 56); an empty batch is an empty result
    from kdpipe.teacher.outliers import clip_maps

    rng = np.random.default_rng(0)
    maps = rng.random((3, 10, 10))
    for q, n, rank in ((0.55, 100, 55), (0.56, 100, 56), (0.98, 196, 193), (0.5, 100, 50)):
        m = rng.random((3, n))
        thr = np.sort(m, axis=1)[:, rank - 1 : rank]
        ref = np.minimum(m, thr)
        ref /= np.sqrt((ref**2).sum(axis=1, keepdims=True))
        np.testing.assert_allclose(clip_maps(m.reshape(3, 1, n), q).reshape(3, n), ref, rtol=1e-6)
    out = clip_maps(maps[:0], 0.9)
    assert out.shape == (0, 10, 10) and out.dtype == np.float32


def test_outlier_stats_against_float64_numpy_and_on_an_empty_batch():
    from kdpipe.teacher.outliers import outlier_stats

    maps = np.random.default_rng(1).random((4, 6, 6)) + 0.01
    flat = maps.reshape(4, 36)
    top = np.mean([(r**2).max() / (r**2).sum() for r in flat])
    ratio = np.mean([r.max() / np.median(r) for r in flat])
    got = outlier_stats(maps.astype(np.float32))
    np.testing.assert_allclose([got["top_cell_mass"], got["max_over_median"]], [top, ratio], rtol=1e-6)
    with pytest.raises(KdpipeError, match="the batch given is empty"):
        outlier_stats(maps[:0])


@pytest.mark.parametrize("start", [0, -5, -1000, -(2**62)])
def test_a_token_slice_from_before_the_first_token_keeps_every_token(tmp_path, start):
    # ONNX clamps a Slice start below -T to 0; the tracker took start - (-995) = 996 as the first patch
    from onnx import TensorProto, numpy_helper

    from kdpipe.teacher.vit_taps import token_tensors

    c = 6
    ints = {"shape": [0, c, 4], "s0": [0], "e1": [1], "ax": [1], "st": [start], "end": [2**63 - 1]}
    inits = [numpy_helper.from_array(np.random.default_rng(0).random((c, 3, 4, 4), np.float32), "w")]
    inits += [numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in ints.items()]
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], strides=[4, 4]),  # (B, 6, 2, 2)
        helper.make_node("Reshape", ["c", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["p"], perm=[0, 2, 1]),  # 4 patch tokens
        helper.make_node("Slice", ["p", "s0", "e1", "ax"], ["cls"]),
        helper.make_node("Concat", ["cls", "p"], ["t"], axis=1),  # (B, 5, 6): patches from 1
        helper.make_node("Slice", ["t", "st", "end", "ax"], ["u"]),  # all 5 tokens
        helper.make_node("ReduceMean", ["u"], ["logits"], axes=[1], keepdims=0),
    ]
    g = helper.make_graph(
        nodes,
        "tokens",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", c])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "t.onnx"))
    found = token_tensors(load_teacher(str(tmp_path / "t.onnx")))
    assert found["t"].tokens == 5 and found["t"].start == 1 and found["t"].grid == (2, 2)
    assert found["u"] == found["t"]


@pytest.mark.parametrize("stream_first", [True, False])
def test_a_single_head_attention_output_is_not_a_patch_grid(tmp_path, stream_first):
    # one head: the attention output (B, T, 1, d) reshaped to (B, T, d) looked like an NHWC map with
    # a (65, 1) grid; with the residual written attn(x) + x the block outputs took that grid (and the
    # class token as a patch)
    import contextlib
    import io
    import warnings

    import torch

    from kdpipe.student.vit import Block
    from kdpipe.teacher.vit_taps import token_tensors

    class BranchFirst(Block):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.attn(self.ln1(x)) + x
            return self.mlp(self.ln2(x)) + x

    torch.manual_seed(0)
    net = V.TinyViT()
    kind = Block if stream_first else BranchFirst
    net.blocks = torch.nn.Sequential(*[kind(V.DIM, 1, mlp_ratio=2.0) for _ in range(2)])
    path = str(tmp_path / "one_head.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(), (torch.zeros(2, 3, V.SIZE, V.SIZE),), path, dynamo=False, opset_version=17,
            input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "b"}},
        )  # fmt: skip
    graph = load_teacher(path)
    assert {t.grid for t in token_tensors(graph).values()} == {GRID}
    taps = auto_taps(graph)
    want = [((V.DIM, *GRID), 1, 1), ((V.DIM, *GRID), 1, 2)]
    assert [(t.shape, t.token_start, t.block) for t in taps] == want
