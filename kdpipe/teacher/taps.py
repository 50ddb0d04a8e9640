"""Tap candidates, the structural ``auto`` choice of stage outputs, and tap resolution.

Layout tracking: every 4-D tensor gets "NCHW", "NHWC" or None. The input's layout seeds it; a
Transpose with perm (0,2,3,1) turns NCHW into NHWC and (0,3,1,2) NHWC into NCHW; ONNX's spatial ops
(Conv, pools, BatchNormalization, ...) produce NCHW by definition; other ops pass on the layout of
their first 4-D input; a Reshape-like op producing 4-D gives None, except a Reshape that keeps the
static shape (tf2onnx's leftover of a Transpose on a 1x1 map), which keeps the layout;
a MatMul keeps NHWC (a Linear over channels) and gives None otherwise (not offered as a tap).

``auto``: per spatial resolution (H, W), the last residual Add (an Add of two 4-D activations of the
same shape), or the Relu right after it when that Relu is its only consumer (post-activation
ResNets), also through a chain of single-consumer Identity/Dropout nodes in between (paddle2onnx).
In pre-activation nets the Add feeds a BatchNormalization, so the raw residual sum is chosen, which
is the stage output there. Resolutions without a residual Add (stems, heads) are skipped. A graph
with no residual Add at all (a plain CNN) falls back to the last activation-like output
(Relu/Clip/.../Add/Conv/BatchNormalization) at each resolution larger than 1x1. Taps are ordered by
depth: resolution from high to low, ties by graph order.

Transformers (:mod:`kdpipe.teacher.vit_taps`): token tensors (B, T, C) tracked back to a patch grid
are candidates too, with layout "NLC" and shape (C, h, w) of the grid; ``auto`` appends every
transformer block's output (in block order) to the CNN stage outputs (a hybrid's conv stem), and the
plain-CNN fallback is not used when blocks exist. ``blocks`` / ``blocks:I,J`` pick blocks by number.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

import onnx

from kdpipe.errors import KdpipeError
from kdpipe.teacher.graph import TeacherGraph
from kdpipe.teacher.modules import module_outputs, tensor_modules
from kdpipe.teacher.vit_taps import blocks as find_blocks
from kdpipe.teacher.vit_taps import group_items, parse_blocks, token_tensors

NCHW_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "ConvInteger",
        "QLinearConv",
        "MaxPool",
        "AveragePool",
        "LpPool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "GlobalLpPool",
        "BatchNormalization",
        "InstanceNormalization",
        "LRN",
        "DepthToSpace",
        "SpaceToDepth",
        "MaxUnpool",
        "MaxRoiPool",
    }
)
RESHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Tile", "Einsum"})
FALLBACK_OPS = frozenset(
    {
        "Relu",
        "Clip",
        "LeakyRelu",
        "PRelu",
        "Elu",
        "Selu",
        "Celu",
        "HardSwish",
        "Gelu",
        "Add",
        "Conv",
        "BatchNormalization",
    }
)
FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)


@dataclass(frozen=True)
class TapInfo:
    """One tappable activation. ``shape`` is (C, H, W) whatever the layout; ``channel_axis`` 1 or 3
    (2 for "NLC" token tensors (B, T, C): then (H, W) is the patch grid, ``tokens`` is T, the patch
    tokens are ``token_start .. token_start + H*W - 1``, ``block`` the 1-based transformer block of a
    block output (0 otherwise) and ``softmax`` that block's attention Softmax, if found)."""

    name: str
    shape: tuple[int, int, int]
    layout: str
    channel_axis: int
    op_type: str
    module_path: str | None
    auto: bool = False
    tokens: int = 0
    token_start: int = 0
    block: int = 0
    softmax: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The manifest record of this tap."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "layout": self.layout,
            "channel_axis": self.channel_axis,
            "op_type": self.op_type,
            "module_path": self.module_path,
        }


PASS_THROUGH_OPS = ("Identity", "Dropout")  # inference no-ops that exporters leave between Add and Relu


def _perm(node: onnx.NodeProto) -> tuple[int, ...] | None:
    for a in node.attribute:
        if a.name == "perm":
            return tuple(a.ints)
    return None


def _same_shape(graph: TeacherGraph, a: str, b: str) -> bool:
    """True when 4-D tensors ``a`` and ``b`` have the same static non-batch dims (a no-op reshape)."""
    sa, sb = graph.shapes.get(a), graph.shapes.get(b)
    return sa is not None and len(sa) == 4 and None not in sa[1:] and sb is not None and sa[1:] == sb[1:]


def layouts(graph: TeacherGraph) -> dict[str, str | None]:
    """Layout of every 4-D tensor reachable from the input (see module docstring)."""
    out: dict[str, str | None] = {graph.input.name: graph.input.layout}
    for node in graph.model.graph.node:
        in4 = [t for t in node.input if t and len(graph.shapes.get(t, ())) == 4]
        first = next((out[t] for t in in4 if out.get(t) is not None), None)
        if node.op_type == "Transpose":
            perm = _perm(node)
            src = out.get(node.input[0])
            if perm == (0, 1, 2, 3):
                lay = src
            elif perm == (0, 2, 3, 1) and src == "NCHW":
                lay = "NHWC"
            elif perm == (0, 3, 1, 2) and src == "NHWC":
                lay = "NCHW"
            else:
                lay = None
        elif node.op_type == "MatMul":
            # a 4-D x (H, W, C) @ (C, C') keeps NHWC (a Linear over channels); NCHW would mix W
            lay = "NHWC" if out.get(node.input[0]) == "NHWC" else None
        elif node.op_type in NCHW_OPS:
            lay = "NCHW"
        elif node.op_type == "Reshape" and _same_shape(graph, node.input[0], node.output[0]):
            lay = out.get(node.input[0])  # tf2onnx writes Transposes of 1x1 maps as such Reshapes
        elif node.op_type in RESHAPE_OPS:
            lay = None
        else:
            lay = first
        for t in node.output:
            if t and len(graph.shapes.get(t, ())) == 4:
                out[t] = lay
    return out


def _chw(shape: tuple[int | None, ...], layout: str) -> tuple[int, int, int] | None:
    c, h, w = (shape[1], shape[2], shape[3]) if layout == "NCHW" else (shape[3], shape[1], shape[2])
    if c is None or h is None or w is None:
        return None
    return int(c), int(h), int(w)


def _all_candidates(graph: TeacherGraph) -> list[TapInfo]:
    lay = layouts(graph)
    mods = tensor_modules(graph.model)
    tokens = token_candidates(graph, mods)
    found: list[TapInfo] = []
    for node in graph.model.graph.node:
        if node.op_type in ("Constant", "ConstantOfShape", "Shape"):
            continue
        for t in node.output:
            if t in tokens:
                found.append(tokens[t])
                continue
            layout = lay.get(t)
            shape = graph.shapes.get(t)
            if not t or layout is None or shape is None or graph.elem_types.get(t) not in FLOAT_TYPES:
                continue
            chw = _chw(shape, layout)
            if chw is None:
                continue
            found.append(
                TapInfo(
                    name=t,
                    shape=chw,
                    layout=layout,
                    channel_axis=1 if layout == "NCHW" else 3,
                    op_type=node.op_type,
                    module_path=mods.get(t),
                )
            )
    return found


def token_candidates(graph: TeacherGraph, mods: dict[str, str]) -> dict[str, TapInfo]:
    """The tracked token tensors (B, T, C) as "NLC" taps of shape (C, h, w), by name
    (:mod:`kdpipe.teacher.vit_taps`); block outputs carry their block number and Softmax."""
    tokens = token_tensors(graph)
    numbered = {b.output: b for b in find_blocks(graph, tokens)}
    out: dict[str, TapInfo] = {}
    for node in graph.model.graph.node:
        for t in node.output:
            tok = tokens.get(t)
            if tok is None or tok.channels < 2 or graph.elem_types.get(t) not in FLOAT_TYPES:
                continue
            blk = numbered.get(t)
            out[t] = TapInfo(name=t, shape=(tok.channels, *tok.grid), layout="NLC", channel_axis=2,
                             op_type=node.op_type, module_path=mods.get(t), tokens=tok.tokens,
                             token_start=tok.start, block=blk.number if blk else 0,
                             softmax=blk.softmax if blk else None)  # fmt: skip
    return out


def _auto_names(graph: TeacherGraph, cands: list[TapInfo]) -> list[str]:
    """CNN stage outputs (module docstring), then every transformer block's output in order."""
    blocks = [c.name for c in sorted((c for c in cands if c.block), key=lambda c: c.block)]
    cands = [c for c in cands if c.layout != "NLC"]
    by_name = {c.name: c for c in cands}
    order = {c.name: i for i, c in enumerate(cands)}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.model.graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    outputs = {o.name for o in graph.model.graph.output}
    picks: dict[tuple[int, int], str] = {}
    for node in graph.model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        a, b = (by_name.get(t) for t in node.input)
        if a is None or b is None or a.shape != b.shape or node.output[0] not in by_name:
            continue
        tap = end = node.output[0]
        while True:  # look through Identity/Dropout (paddle2onnx puts an Identity after every Add)
            users = consumers.get(end, [])
            if len(users) != 1 or end in outputs:
                break
            if users[0].op_type == "Relu" and users[0].output[0] in by_name:
                tap = users[0].output[0]
                break
            if users[0].op_type not in PASS_THROUGH_OPS or users[0].output[0] not in by_name:
                break
            end = users[0].output[0]
        picks[by_name[tap].shape[1:]] = tap
    if not picks and not blocks:  # plain CNN: last activation-like output per resolution
        for c in cands:
            if c.op_type in FALLBACK_OPS and c.shape[1] * c.shape[2] > 1:
                picks[c.shape[1:]] = c.name
    stages = sorted(picks.values(), key=lambda t: (-by_name[t].shape[1] * by_name[t].shape[2], order[t]))
    return stages + blocks


def candidates(graph: TeacherGraph) -> list[TapInfo]:
    """All tappable 4-D activations in graph order; ``auto`` is True on the auto picks."""
    cands = _all_candidates(graph)
    auto = set(_auto_names(graph, cands))
    return [TapInfo(**{**c.__dict__, "auto": c.name in auto}) for c in cands]


def auto_taps(graph: TeacherGraph) -> list[TapInfo]:
    """The structural stage outputs, ordered by depth (see module docstring)."""
    cands = _all_candidates(graph)
    by_name = {c.name: c for c in cands}
    return [TapInfo(**{**by_name[n].__dict__, "auto": True}) for n in _auto_names(graph, cands)]


def resolve_taps(graph: TeacherGraph, spec: str | list[str]) -> list[TapInfo]:
    """Taps from ``"auto"``, ONNX tensor names, torch module paths or ``re:PATTERN``.

    ``spec`` is a list or a comma-separated string. A regex must match a whole tensor name or module
    path (``re.fullmatch``) and selects every matching candidate in depth order. Unknown names raise
    KdpipeError listing the closest tensor names and module paths.
    """
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [s.strip() for s in spec]
    items = group_items([s for s in items if s])
    if not items:
        raise KdpipeError("no taps given; use --taps auto, tensor names, module paths or re:PATTERN")
    cands = candidates(graph)
    by_name = {c.name: c for c in cands}
    mods = module_outputs(graph.model)
    result: list[TapInfo] = []
    for item in items:
        if item == "auto":
            found = [by_name[t.name] for t in auto_taps(graph)]
            if not found:
                raise KdpipeError(
                    f"--taps auto found no stage outputs in {graph.path!r}; "
                    "name the taps (see kdpipe inspect)"
                )
        elif item == "blocks" or item.startswith("blocks:"):
            numbered = sorted((c for c in cands if c.block), key=lambda c: c.block)
            found = [numbered[n - 1] for n in parse_blocks(item, len(numbered), repr(graph.path))]
        elif item.startswith("re:"):
            try:
                pat = re.compile(item[3:])
            except re.error as e:
                raise KdpipeError(f"tap {item!r}: bad regular expression ({e})") from e
            found = [
                c for c in cands if pat.fullmatch(c.name) or (c.module_path and pat.fullmatch(c.module_path))
            ]
            found += [
                by_name[t]
                for p, t in mods.items()
                if pat.fullmatch(p) and t in by_name and by_name[t] not in found
            ]
            if not found:
                raise KdpipeError(
                    f"tap {item!r} matches no 4-D activation; see kdpipe inspect for the candidates"
                )
            pos = {c.name: i for i, c in enumerate(cands)}
            found.sort(key=lambda c: pos[c.name])
        elif item in by_name:
            found = [by_name[item]]
        elif item in mods:
            t = mods[item]
            if t not in by_name:
                raise KdpipeError(
                    f"tap {item!r}: the output of module {item!r} ({t!r}, shape {graph.shapes.get(t)}) "
                    "is not a 4-D activation"
                )
            found = [by_name[t]]
        elif item in graph.shapes:
            raise KdpipeError(
                f"tap {item!r} is not a 4-D activation with a known layout (shape {graph.shapes.get(item)}); "
                "see kdpipe inspect for the candidates"
            )
        else:
            pool = list(by_name) + list(mods)
            close = difflib.get_close_matches(item, pool, n=5, cutoff=0.5)
            hint = f"close matches: {', '.join(close)}" if close else "see kdpipe inspect for the candidates"
            raise KdpipeError(f"unknown tap {item!r} in {graph.path!r}; {hint}")
        for f in found:
            if f.name not in {r.name for r in result}:
                result.append(f)
    return result
