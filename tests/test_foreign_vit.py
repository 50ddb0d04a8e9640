"""A transformer teacher from a foreign framework: a Flax (nnx) ViT exported by jax2onnx, checked against
JAX's own activations (``tests/fixtures/jax_vit_jax2onnx.{onnx,npz}``, made by
``tests/fixtures/make_foreign_teachers.py jax-vit`` in a separate venv; JAX is not needed here).

The graph differs from torch's: NHWC input with a Transpose in front, the patch Conv between two
Transposes (its NHWC output is reshaped into tokens), LayerNorm decomposed into ReduceMean/Sub/Div/...,
and every Dense as Reshape -> Gemm -> Reshape. The .npz holds 4 NHWC uint8 images, the logits,
``act_i`` (each block's output, (4, 65, 32)) and ``cls_attn_i`` (the class token's softmax row over the
64 patch tokens per head, (4, 2, 64)).
"""

from __future__ import annotations

import json
from pathlib import Path

import _models as M
import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from kdpipe.cli import cli
from kdpipe.teacher import auto_taps, load_teacher
from kdpipe.teacher.surgery import expose

FIXTURE = Path(__file__).parent / "fixtures" / "jax_vit_jax2onnx"
DEPTH, TOKENS, GRID, DIM = 4, 65, (8, 8), 32
SHARD = Path("shards") / "00000-of-00001"


def _ref() -> dict[str, np.ndarray]:
    with np.load(f"{FIXTURE}.npz") as z:
        return {k: z[k] for k in z.files}


def _input(ref: dict[str, np.ndarray]) -> np.ndarray:
    """The float32 NHWC input JAX saw: uint8 / 255 in float64, rounded once."""
    return (ref["x"].astype(np.float64) / 255.0).astype(np.float32)


def test_auto_taps_are_the_flax_block_outputs():
    ref = _ref()
    graph = load_teacher(f"{FIXTURE}.onnx")
    assert graph.input.layout == "NHWC" and graph.input.batch is None
    taps = auto_taps(graph)
    assert [(t.layout, t.block, t.tokens, t.token_start, t.shape) for t in taps] == [
        ("NLC", b, TOKENS, 1, (DIM, *GRID)) for b in range(1, DEPTH + 1)
    ]
    names = [t.name for t in taps] + [t.softmax for t in taps]
    sess = ort.InferenceSession(expose(graph.model, names, graph.elem_types).SerializeToString(),
                                providers=["CPUExecutionProvider"])  # fmt: skip
    got = sess.run([graph.logits_name, *names], {graph.input.name: _input(ref)})
    np.testing.assert_allclose(got[0], ref["logits"], rtol=1e-5, atol=2e-5)
    for i in range(DEPTH):
        np.testing.assert_allclose(got[1 + i], ref[f"act_{i}"], rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(got[1 + DEPTH + i][:, :, 0, 1:], ref[f"cls_attn_{i}"], atol=1e-6)


def _expected(ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float64 cache arrays of the plain view from JAX's block outputs and attention rows."""
    n = len(ref["x"])
    out = {"logits": ref["logits"].astype(np.float64).reshape(n, 1, -1)}
    for i in range(DEPTH):
        grid = ref[f"act_{i}"].astype(np.float64)[:, 1:].reshape(n, *GRID, DIM)  # patch tokens, row-major
        maps = M.reference_targets(grid, axis=3)
        maps["attn"] = ref[f"cls_attn_{i}"].astype(np.float64).mean(axis=1).reshape(n, *GRID)
        out |= {f"{k}.{i}": v.reshape(n, 1, *v.shape[1:]) for k, v in maps.items()}
    return out


@pytest.mark.parametrize(("reduce", "dtype"), [("graph", "float32"), ("native", "float16")])
def test_cached_targets_match_jax(tmp_path, reduce, dtype):
    ref = _ref()
    n = len(ref["x"])
    np.savez(tmp_path / "data.npz", x=ref["x"], y=np.arange(n) % 10)
    out = tmp_path / "cache"
    args = ["cache-teacher", f"{FIXTURE}.onnx", "--data", str(tmp_path / "data.npz"), "--out", str(out)]
    args += ["--views", "0", "--reduce", reduce, "--dtype", dtype, "--vec-dtype", "float32", "--threads", "1"]
    args += ["--targets", "logits,at,dct,pooled,attn", "--dct-variant", ",".join(M.DCT_VARIANTS)]
    r = CliRunner().invoke(cli, [*args, "--no-progress"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [t["layout"] for t in manifest["taps"]] == ["NLC"] * DEPTH
    expected = _expected(ref)
    assert sorted(a for a in manifest["arrays"] if a not in ("labels", "view_params")) == sorted(expected)
    for name, want in expected.items():
        got = np.load(out / SHARD / f"{name}.npy").astype(np.float64)
        maps = name.split(".")[0] in ("at", "dct", "attn")
        tol = dict(rtol=1e-3, atol=2e-4) if maps and dtype == "float16" else dict(rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(got, want, err_msg=name, **tol)  # type: ignore[arg-type]
