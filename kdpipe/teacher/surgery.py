"""Graph surgery: expose tensors as outputs, append the per-tap target reductions in ONNX.

For a tap F with channel axis c and spatial axes s (NCHW: c=1, s=(2,3); NHWC: c=3, s=(1,2)):

    a      = ReduceMean(Mul(F, F), axes=[c], keepdims=0)          (B, H, W)
    at     = Div(a, Max(ReduceL2(a, axes=[1, 2], keepdims=1), 1e-12))
    pooled = ReduceMean(F, axes=s, keepdims=0)                    (B, C)

computed in float32 (a float16 tap is cast first). Reduce ops take ``axes`` as an input from opset 18
(ReduceSum from 13) and as an attribute before; the builder follows the model's opset.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kdpipe.ops import AT_EPS
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
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` computing the requested per-tap targets as new float32 outputs.

    Returns the model and a map from cache array name (``at.{i}``, ``pooled.{i}``) to output name.
    """
    m = copy.deepcopy(model)
    b = _Builder(m, opset)
    outputs: dict[str, str] = {}
    eps = b.const(np.asarray(AT_EPS, dtype=np.float32), "eps") if want_at else ""
    for i, tap in enumerate(taps):
        f = tap.name
        if elem_types.get(f, TensorProto.FLOAT) != TensorProto.FLOAT:
            f = b.node("Cast", [f], f"t{i}_f32", to=TensorProto.FLOAT)
        if want_at:
            sq = b.node("Mul", [f, f], f"t{i}_sq")
            a = b.reduce("ReduceMean", sq, [tap.channel_axis], 0, f"t{i}_chmean")
            norm = b.reduce("ReduceL2", a, [1, 2], 1, f"t{i}_norm")
            den = b.node("Max", [norm, eps], f"t{i}_den")
            outputs[f"at.{i}"] = b.node("Div", [a, den], f"t{i}_at")
        if want_pooled:
            spatial = [2, 3] if tap.channel_axis == 1 else [1, 2]
            outputs[f"pooled.{i}"] = b.reduce("ReduceMean", f, spatial, 0, f"t{i}_pooled")
    for out in outputs.values():
        m.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    return m, outputs
