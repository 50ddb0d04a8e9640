"""Graph surgery: expose tensors as outputs, append the per-tap target reductions in ONNX.

For a tap F with channel axis c and spatial axes s (NCHW: c=1, s=(2,3); NHWC: c=3, s=(1,2)):

    a      = ReduceMean(Mul(F, F), axes=[c], keepdims=0)          (B, H, W)
    at     = Div(a, Max(ReduceL2(a, axes=[1, 2], keepdims=1), 1e-12))
    pooled = ReduceMean(F, axes=s, keepdims=0)                    (B, C)

For NCHW taps of static shape the same values come from ops that suit onnxruntime's blocked conv
layout: ``a`` = Conv(Mul(F, F), 1/C weights of shape (1, C, 1, 1)), ``pooled`` =
Flatten(GlobalAveragePool(F)).

computed in float32 (a float16 tap is cast first). Reduce ops take ``axes`` as an input from opset 18
(ReduceSum from 13) and as an attribute before; the builder follows the model's opset.

DCT-driven targets (``kdpipe.ops.dct_targets_numpy`` defines them) are computed from ``at`` in the
graph too, as matrix products: with ``a0 = at - mean_hw(at)``, Re FFT2(a0) = C_H a0 C_W - S_H a0 S_W
(C, S: cos/sin of 2*pi*j*k/n) and the orthonormal DCT-II is D_H a0 D_W^T. A few small GEMMs per map
cost far less than a host-side FFT pass; the per-sample min-max normalisation follows.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kdpipe.ops import AT_EPS, DCT_EPS
from kdpipe.teacher.taps import TapInfo

PREFIX = "kdpipe__"


def expose(model: onnx.ModelProto, names: list[str], elem_types: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` with ``names`` appended to the graph outputs (those not outputs yet)."""
    m = copy.deepcopy(model)
    present = {o.name for o in m.graph.output}
    for name in names:
        if name not in present:
            m.graph.output.append(
                helper.make_tensor_value_info(name, elem_types.get(name, TensorProto.FLOAT), None)
            )
            present.add(name)
    return m


class _Builder:
    def __init__(self, model: onnx.ModelProto, opset: int) -> None:
        self.g = model.graph
        self.opset = opset
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{PREFIX}{hint}_{self.count}"

    def node(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.name(hint)
        self.g.node.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.g.initializer.append(numpy_helper.from_array(value, name))
        return name

    def reduce(self, op: str, x: str, axes: list[int], keepdims: int, hint: str) -> str:
        axes_as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if axes_as_input:
            ax = self.const(np.asarray(axes, dtype=np.int64), hint + "_axes")
            return self.node(op, [x, ax], hint, keepdims=keepdims)
        return self.node(op, [x], hint, axes=axes, keepdims=keepdims)


def append_reductions(
    model: onnx.ModelProto,
    opset: int,
    taps: list[TapInfo],
    elem_types: dict[str, int],
    want_at: bool,
    want_pooled: bool,
    dct_variants: tuple[str, ...] = (),
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` computing the requested per-tap targets as new float32 outputs.

    Returns the model and a map from cache array name (``at.{i}``, ``pooled.{i}``,
    ``dct.{variant}.{i}``) to output name. DCT targets need the maps; with ``want_at`` False they are
    computed but not output.
    """
    want_at_output = want_at
    want_at = want_at or bool(dct_variants)
    m = copy.deepcopy(model)
    b = _Builder(m, opset)
    outputs: dict[str, str] = {}
    eps = b.const(np.asarray(AT_EPS, dtype=np.float32), "eps") if want_at else ""
    for i, tap in enumerate(taps):
        f = tap.name
        if elem_types.get(f, TensorProto.FLOAT) != TensorProto.FLOAT:
            f = b.node("Cast", [f], f"t{i}_f32", to=TensorProto.FLOAT)
        c, h, w = tap.shape
        blocked = tap.channel_axis == 1 and all(isinstance(d, int) and d > 0 for d in (c, h, w))
        if want_at and blocked:
            # onnxruntime's CPU convs keep NCHW maps in a blocked layout (NCHWc) and convert a tensor
            # back before any op that cannot read it. Mul and Conv read it: the channel mean as a 1x1
            # conv with weights 1/C leaves only the one-channel map to convert.
            sq = b.node("Mul", [f, f], f"t{i}_sq")
            mean_w = b.const(np.full((1, c, 1, 1), 1.0 / c, np.float32), f"t{i}_meanw")
            a = b.node("Conv", [sq, mean_w], f"t{i}_chmean", kernel_shape=[1, 1])
            a = b.node("Reshape", [a, b.const(np.asarray([0, h, w], np.int64), "shape")], f"t{i}_map")
        elif want_at:
            sq = b.node("Mul", [f, f], f"t{i}_sq")
            a = b.reduce("ReduceMean", sq, [tap.channel_axis], 0, f"t{i}_chmean")
        if want_at:
            norm = b.reduce("ReduceL2", a, [1, 2], 1, f"t{i}_norm")
            den = b.node("Max", [norm, eps], f"t{i}_den")
            outputs[f"at.{i}"] = b.node("Div", [a, den], f"t{i}_at")
        if want_pooled and tap.channel_axis == 1:  # GlobalAveragePool reads the blocked layout directly
            gap = b.node("GlobalAveragePool", [f], f"t{i}_gap")
            outputs[f"pooled.{i}"] = b.node("Flatten", [gap], f"t{i}_pooled", axis=1)
        elif want_pooled:
            outputs[f"pooled.{i}"] = b.reduce("ReduceMean", f, [1, 2], 0, f"t{i}_pooled")
    if dct_variants:
        for i, tap in enumerate(taps):
            _, h, w = tap.shape
            for v in dct_variants:
                outputs[f"dct.{v}.{i}"] = _dct(b, outputs[f"at.{i}"], int(h), int(w), v, f"t{i}_{v}")
        if not want_at_output:
            for i in range(len(taps)):
                del outputs[f"at.{i}"]
    for out in outputs.values():
        m.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    return m, outputs


def _dft_mats(n: int, variant: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(first, second) float32 (n, n) matrices: (cos, sin) of 2*pi*j*k/n, or (DCT-II^T, None)."""
    j = np.arange(n, dtype=np.float64)
    if variant == "dct2":
        d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * j[None, :] + 1) * j[:, None] / (2 * n))
        d[0] /= np.sqrt(2.0)
        return d.T.astype(np.float32), None  # a0 @ D^T transforms the last axis
    ang = 2 * np.pi * np.outer(j, j) / n
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _transform(b: _Builder, a0: str, h: int, w: int, variant: str, hint: str) -> str:
    """R^T (B, W, H): the transform of a0 (B, H, W), as GEMMs on the last axis and a transpose."""
    fw, sw = _dft_mats(w, variant)
    fh, sh = _dft_mats(h, variant)

    def both_axes(mw: np.ndarray, mh: np.ndarray, tag: str) -> str:
        x = b.node("MatMul", [a0, b.const(mw, f"{hint}_{tag}w")], f"{hint}_{tag}1")  # (B, H, W) @ (W, W)
        x = b.node("Transpose", [x], f"{hint}_{tag}t", perm=[0, 2, 1])  # (B, W, H)
        return b.node("MatMul", [x, b.const(mh, f"{hint}_{tag}h")], f"{hint}_{tag}2")  # @ (H, H)

    first = both_axes(fw, fh, "c")
    if sw is None or sh is None:
        return first
    # cos and sin matrices are symmetric: (C_H a0 C_W)^T = (a0 C_W)^T C_H
    return b.node("Sub", [first, both_axes(sw, sh, "s")], f"{hint}_re")


def _dct(b: _Builder, at: str, h: int, w: int, variant: str, hint: str) -> str:
    """DCT-driven target (B, H, W) of the map ``at``; see ``kdpipe.ops.dct_targets_numpy``."""
    mean = b.reduce("ReduceMean", at, [1, 2], 1, f"{hint}_mean")
    a0 = b.node("Sub", [at, mean], f"{hint}_a0")
    r = _transform(b, a0, h, w, variant, hint)
    if variant == "dft-abs":
        r = b.node("Abs", [r], f"{hint}_abs")
    lo = b.reduce("ReduceMin", r, [1, 2], 1, f"{hint}_lo")
    hi = b.reduce("ReduceMax", r, [1, 2], 1, f"{hint}_hi")
    den = hi if variant == "dft-abs" else b.node("Sub", [hi, lo], f"{hint}_den")
    big = b.node(
        "Greater",
        [b.node("Abs", [den], f"{hint}_absden"), b.const(np.asarray(DCT_EPS, dtype=np.float32), "deps")],
        f"{hint}_ok",
    )
    one = b.const(np.ones((1, 1, 1), np.float32), f"{hint}_one")
    zero = b.const(np.zeros((1, 1, 1), np.float32), f"{hint}_zero")
    safe = b.node("Where", [big, den, one], f"{hint}_safe")
    scaled = b.node("Div", [b.node("Sub", [r, lo], f"{hint}_shift"), safe], f"{hint}_scaled")
    out_t = b.node("Where", [big, scaled, zero], f"{hint}_t")
    return b.node("Transpose", [out_t], hint, perm=[0, 2, 1])
