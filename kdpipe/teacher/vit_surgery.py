"""Graph surgery for token taps: the patch grid and the class-token attention, inside onnxruntime.

For an "NLC" tap F (B, T, C) whose patch tokens are ``s .. s+h*w-1``:

    grid = Reshape(Slice(F, starts=[s], ends=[s+h*w], axes=[1]), [0, h, w, C])     (B, h, w, C)

drops the extra tokens and lays the patch tokens out as an NHWC map, so the usual NHWC reductions
(:mod:`kdpipe.teacher.surgery`, or the native ops on the exposed grid) give ``at``, ``pooled`` and
DCT on the patch grid; the full token tensor never leaves onnxruntime.

The ``attn`` target of a block with Softmax P (B, heads, T, T), class token at index q:

    attn = Reshape(ReduceMean(Slice(P, [q, s], [q+1, s+h*w], axes=[2, 3]), axes=[1, 2]), [0, h, w])

the class token's attention to each patch token, averaged over heads (rows of P sum to 1 over all T
keys, so a map sums to at most 1; it is stored as it is, not renormalised).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, helper

from kdpipe.errors import KdpipeError
from kdpipe.teacher.surgery import _Builder
from kdpipe.teacher.taps import TapInfo


def class_token(tap: TapInfo) -> int:
    """Index of the class token of a token tap: the first extra token. KdpipeError without one."""
    c, h, w = tap.shape
    if tap.token_start > 0:
        return 0
    if tap.tokens > h * w:
        return h * w  # extra tokens after the patches
    raise KdpipeError(
        f"--targets attn: tap {tap.name!r} has no class token ({tap.tokens} tokens, all patches); "
        "the attention map is the class token's attention, so drop attn from --targets"
    )


def check_attention(taps: list[TapInfo]) -> None:
    """KdpipeError unless every tap is a transformer block with a Softmax and a class token."""
    for tap in taps:
        if tap.layout != "NLC" or not tap.softmax:
            raise KdpipeError(
                f"--targets attn: tap {tap.name!r} is not a transformer block output with an attention "
                "Softmax; use --taps auto or blocks:I,J on a ViT teacher, or drop attn from --targets"
            )
        class_token(tap)


def _slice(b: _Builder, x: str, starts: list[int], ends: list[int], axes: list[int], hint: str) -> str:
    i64 = np.int64
    ins = [b.const(np.asarray(v, i64), f"{hint}_{k}") for k, v in (("s", starts), ("e", ends), ("a", axes))]
    return b.node("Slice", [x, *ins], hint)


def grid_views(
    model: onnx.ModelProto, opset: int, taps: list[TapInfo], elem_types: dict[str, int]
) -> tuple[onnx.ModelProto, list[TapInfo], dict[str, int]]:
    """``model`` with a (B, h, w, C) patch grid per "NLC" tap, the taps with NHWC grids in their place
    (other taps unchanged), and ``elem_types`` with the new tensors. No NLC tap: returned as given."""
    if not any(t.layout == "NLC" for t in taps):
        return model, list(taps), elem_types
    m = copy.deepcopy(model)
    b = _Builder(m, opset)
    types = dict(elem_types)
    out: list[TapInfo] = []
    for i, tap in enumerate(taps):
        if tap.layout != "NLC":
            out.append(tap)
            continue
        c, h, w = tap.shape
        s = tap.token_start
        patches = _slice(b, tap.name, [s], [s + h * w], [1], f"t{i}_patches")
        shape = b.const(np.asarray([0, h, w, c], np.int64), f"t{i}_gridshape")
        grid = b.node("Reshape", [patches, shape], f"t{i}_grid")
        types[grid] = elem_types.get(tap.name, TensorProto.FLOAT)
        out.append(replace(tap, name=grid, layout="NHWC", channel_axis=3))
    return m, out, types


def append_attention(
    model: onnx.ModelProto, opset: int, taps: list[TapInfo], elem_types: dict[str, int]
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """``model`` computing ``attn.{i}`` (B, h, w) float32 for every tap (module docstring) as new
    outputs, and the map from array name to output name. KdpipeError for a tap that is not a
    transformer block with a Softmax, or without a class token."""
    check_attention(taps)
    m = copy.deepcopy(model)
    b = _Builder(m, opset)
    outputs: dict[str, str] = {}
    for i, tap in enumerate(taps):
        assert tap.softmax is not None
        _, h, w = tap.shape
        q, s = class_token(tap), tap.token_start
        p = tap.softmax
        if elem_types.get(p, TensorProto.FLOAT) != TensorProto.FLOAT:
            p = b.node("Cast", [p], f"t{i}_attn_f32", to=TensorProto.FLOAT)
        row = _slice(b, p, [q, s], [q + 1, s + h * w], [2, 3], f"t{i}_clsrow")  # (B, heads, 1, h*w)
        mean = b.reduce("ReduceMean", row, [1, 2], 0, f"t{i}_headmean")  # (B, h*w)
        shape = b.const(np.asarray([0, h, w], np.int64), f"t{i}_attnshape")
        outputs[f"attn.{i}"] = b.node("Reshape", [mean, shape], f"t{i}_attn")
    for out in outputs.values():
        m.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    return m, outputs
