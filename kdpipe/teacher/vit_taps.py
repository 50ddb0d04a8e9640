"""Transformer (ViT/DeiT-style) taps: token tensors on their patch grid, and the blocks' outputs.

A *token tensor* is a 3-D float activation (B, T, C) ("NLC") whose tokens ``start .. start+h*w-1``
are the patch tokens of an (h, w) grid, row-major; the others are extra tokens (class, DeiT's
distillation token, registers). Tracking, in graph order:

- seeds: the patch grid is read from the tensor that is reshaped into tokens, never from a square
  root: a Reshape of an NCHW map (B, C, h, w) to (B, C, h*w) followed by a Transpose (0, 2, 1) (torch's
  ``flatten(2).transpose(1, 2)``), or a Reshape of an NHWC map or a patchified tensor (B, h, w, ...)
  to (B, h*w, D) (Flax/Keras patch embeddings, patchify-by-reshape); a 4-D (B, h, w, C) source needs
  h, w > 1 (a single attention head's (B, T, 1, d) merged back into tokens is no grid);
- a Concat on the token axis with one tracked input shifts ``start`` by the tokens before it;
- a Slice of the token axis with constant bounds that keeps every patch token shifts it back;
- token-wise ops (elementwise ops, LayerNormalization, activations, a MatMul by a weight matrix)
  pass the positions on when their output keeps the token count.
Ops that mix tokens (attention products, token-axis reductions, Transposes) end the tracking.

A *block output* is the residual Add after the MLP: an Add of two token tensors where one input
(the stream) is an ancestor of the other (the branch), and the branch contains no Softmax (or ONNX
Attention op); it ends a block when an attention residual (a branch with a Softmax) came since the
previous block output. This holds for pre-norm blocks (``x + attn(ln(x)); x + mlp(ln(x))``) and
post-norm ones (the stream passes through LayerNormalization). The block's Softmax (B, heads, T, T)
is remembered for the ``attn`` target.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from kdpipe.errors import KdpipeError
from kdpipe.teacher.graph import TeacherGraph

TOKENWISE_OPS = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Identity", "Dropout", "Cast", "Gelu",
        "Relu", "Erf", "Sigmoid", "Tanh", "Sqrt", "Reciprocal", "Neg", "Abs", "Clip", "HardSwish",
        "HardSigmoid", "LeakyRelu", "Elu", "Softplus", "Mish", "LayerNormalization",
    }
)  # fmt: skip
ATTENTION_OPS = frozenset({"Softmax", "Attention", "MultiHeadAttention"})


@dataclass(frozen=True)
class Tokens:
    """Where the patch tokens of a (B, T, C) tensor are: tokens ``start .. start + h*w - 1``."""

    tokens: int
    channels: int
    start: int
    grid: tuple[int, int]

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def extra(self) -> int:
        """Number of extra (non-patch) tokens."""
        return self.tokens - self.patches


@dataclass(frozen=True)
class Block:
    """One transformer block: its output tensor (the Add after the MLP), 1-based number, Softmax."""

    output: str
    number: int
    softmax: str | None


def _int_values(name: str, consts: dict[str, np.ndarray]) -> list[int] | None:
    """The integer values of a constant tensor (initializer or Constant node), else None."""
    v = consts.get(name)
    return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]


def _small_ints(t: onnx.TensorProto) -> np.ndarray | None:
    """The values of a small integer tensor (a shape, axes, starts, ...); None for anything else, and
    for a malformed one (onnxruntime names that when it loads the model)."""
    if t.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) or int(np.prod(t.dims)) > 64:
        return None
    try:
        return numpy_helper.to_array(t)
    except (ValueError, TypeError):
        return None


def _constants(graph: TeacherGraph) -> dict[str, np.ndarray]:
    """Small integer constants by tensor name (initializers and Constant nodes): what token tracking
    reads (reshape shapes, slice bounds); weights are never decoded."""
    out: dict[str, np.ndarray] = {}
    for i in graph.model.graph.initializer:
        v = _small_ints(i)
        if v is not None:
            out[i.name] = v
    for node in graph.model.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value" and (v := _small_ints(a.t)) is not None:
                    out[node.output[0]] = v
    return out


def _axis(node: onnx.NodeProto, default: int = 0) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return default


def _perm(node: onnx.NodeProto) -> tuple[int, ...] | None:
    for a in node.attribute:
        if a.name == "perm":
            return tuple(a.ints)
    return None


class _Tracker:
    """Propagates :class:`Tokens` through the graph (module docstring)."""

    def __init__(self, graph: TeacherGraph) -> None:
        from kdpipe.teacher.taps import layouts

        self.g = graph
        self.layouts = layouts(graph)
        self.consts = _constants(graph)
        self.found: dict[str, Tokens] = {}
        self.channel_first: dict[str, tuple[int, int]] = {}  # (B, C, h*w) -> grid, awaiting a Transpose

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        return self.g.shapes.get(name)

    def tc(self, name: str) -> tuple[int, int] | None:
        """(T, C) of a 3-D tensor with static non-batch dims, else None."""
        s = self.shape(name)
        if s is None or len(s) != 3 or s[1] is None or s[2] is None:
            return None
        return int(s[1]), int(s[2])

    def run(self) -> dict[str, Tokens]:
        for node in self.g.model.graph.node:
            if not node.output or not node.output[0]:
                continue
            out = node.output[0]
            got = self.visit(node, out)
            if got is not None and self.tc(out) is not None:
                self.found[out] = got
        return self.found

    def visit(self, node: onnx.NodeProto, out: str) -> Tokens | None:
        op = node.op_type
        if op in ("Reshape", "Flatten"):
            return self.seed(node, out)
        if op == "Transpose":
            grid, tc = self.channel_first.get(node.input[0]), self.tc(out)
            if grid is not None and _perm(node) == (0, 2, 1) and tc is not None:
                return Tokens(tc[0], tc[1], 0, grid)
            return None
        if op == "Concat":
            return self.concat(node, out)
        if op == "Slice":
            return self.slice(node, out)
        if op in TOKENWISE_OPS or op == "MatMul":
            return self.tokenwise(node, out)
        return None

    def seed(self, node: onnx.NodeProto, out: str) -> Tokens | None:
        src, tc = self.shape(node.input[0]), self.tc(out)
        if src is None or tc is None or len(src) < 4 or any(d is None for d in src[1:]):
            return None
        n, d = tc
        dims = [int(x or 0) for x in src[1:]]
        if len(src) == 4 and self.layouts.get(node.input[0]) == "NCHW":
            c, h, w = dims
            if n == c and d == h * w:
                self.channel_first[out] = (h, w)
            return None
        h, w = dims[0], dims[1]
        if len(src) == 4 and 1 in (h, w):
            return None  # a single head's (B, T, 1, d) or (B, 1, T, d) merged back into tokens: no grid
        if h * w == n and int(np.prod(dims[2:])) == d and self.layouts.get(node.input[0]) != "NCHW":
            return Tokens(n, d, 0, (h, w))
        return None

    def concat(self, node: onnx.NodeProto, out: str) -> Tokens | None:
        tcs = [self.tc(t) for t in node.input]
        tracked = [i for i, t in enumerate(node.input) if t in self.found]
        if any(tc is None for tc in tcs) or _axis(node) not in (1, -2) or len(tracked) != 1:
            return None
        counts = [tc[0] for tc in tcs if tc is not None]
        tok = self.found[node.input[tracked[0]]]
        return Tokens(sum(counts), tok.channels, tok.start + sum(counts[: tracked[0]]), tok.grid)

    def slice(self, node: onnx.NodeProto, out: str) -> Tokens | None:
        tok = self.found.get(node.input[0])
        if tok is None or len(node.input) < 3:
            return None
        starts = _int_values(node.input[1], self.consts)
        ends = _int_values(node.input[2], self.consts)
        axes = _int_values(node.input[3], self.consts) if len(node.input) > 3 and node.input[3] else [0]
        steps = _int_values(node.input[4], self.consts) if len(node.input) > 4 and node.input[4] else [1]
        if starts is None or ends is None or axes is None or steps is None or len(starts) != 1:
            return None
        if axes[0] not in (1, -2) or steps[0] != 1:
            return None
        t = tok.tokens  # ONNX: a negative bound counts from the end, then both are clamped to [0, T]
        s0 = min(max(starts[0] + t if starts[0] < 0 else starts[0], 0), t)
        s1 = min(max(ends[0] + t if ends[0] < 0 else ends[0], 0), t)
        if s0 > tok.start or s1 < tok.start + tok.patches:
            return None
        return Tokens(s1 - s0, tok.channels, tok.start - s0, tok.grid)

    def tokenwise(self, node: onnx.NodeProto, out: str) -> Tokens | None:
        tc = self.tc(out)
        if tc is None:
            return None
        inputs = node.input[:1] if node.op_type == "MatMul" else node.input
        if node.op_type == "MatMul" and len(self.shape(node.input[1]) or ()) > 2:
            return None  # a product with another activation mixes tokens (attention)
        for t in inputs:
            tok = self.found.get(t)
            if tok is not None and tok.tokens == tc[0]:
                return Tokens(tok.tokens, tc[1], tok.start, tok.grid)
        return None


def token_tensors(graph: TeacherGraph) -> dict[str, Tokens]:
    """Every tracked token tensor of the graph (module docstring), by name."""
    return _Tracker(graph).run()


def _producers(graph: TeacherGraph) -> dict[str, int]:
    return {t: i for i, n in enumerate(graph.model.graph.node) for t in n.output if t}


def _branch(
    graph: TeacherGraph, producers: dict[str, int], branch: str, stream: str, stop: int
) -> tuple[bool, str | None]:
    """Walk back from ``branch`` over the nodes after index ``stop``: (reaches ``stream``, the last
    attention op's output met, if any)."""
    nodes = graph.model.graph.node
    start = producers.get(branch)
    if start is None:
        return False, None
    seen, queue = {start}, deque([start])
    reaches, soft, soft_at = False, None, -1
    while queue:
        k = queue.popleft()
        node = nodes[k]
        if node.op_type in ATTENTION_OPS and k > soft_at:
            soft, soft_at = node.output[0], k
        for t in node.input:
            if t == stream:
                reaches = True
            j = producers.get(t)
            if j is not None and j > stop and j not in seen:
                seen.add(j)
                queue.append(j)
    return reaches, soft


def blocks(graph: TeacherGraph, tokens: dict[str, Tokens] | None = None) -> list[Block]:
    """The transformer blocks' outputs in graph order (module docstring); empty for a CNN."""
    tokens = token_tensors(graph) if tokens is None else tokens
    producers = _producers(graph)
    found: list[Block] = []
    softmax: str | None = None
    for node in graph.model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2 or node.output[0] not in tokens:
            continue
        a, b = node.input
        sa, sb = graph.shapes.get(a), graph.shapes.get(b)
        if sa is None or sb is None or len(sa) != 3 or sa[1:] != sb[1:]:
            continue
        stream, branch = (a, b) if producers.get(a, -1) < producers.get(b, -1) else (b, a)
        reaches, soft = _branch(graph, producers, branch, stream, producers.get(stream, -1))
        if not reaches:
            continue
        if soft is not None:
            shape = graph.shapes.get(soft)  # kept for the attn target when it is (B, heads, T, T)
            t = tokens[node.output[0]].tokens
            softmax = softmax or (
                soft if shape is not None and len(shape) == 4 and shape[2:] == (t, t) else ""
            )
        elif softmax is not None:
            found.append(Block(node.output[0], len(found) + 1, softmax or None))
            softmax = None
    return found


def is_int(text: str) -> bool:
    """Whether ``text`` is a plain decimal integer (ASCII digits, optional leading minus): what
    ``int`` accepts without ValueError, and nothing more (no ``--3``, ``+3``, ``1_0`` or ``²``)."""
    return re.fullmatch(r"-?[0-9]+", text) is not None


def parse_blocks(item: str, count: int, where: str) -> list[int]:
    """1-based block numbers of a ``blocks`` or ``blocks:4,8,12`` tap item (negative: from the end)."""
    if count == 0:
        raise KdpipeError(
            f"tap {item!r}: {where} has no transformer blocks (no residual Add after an MLP was found); "
            "name the taps instead (see kdpipe inspect)"
        )
    if item == "blocks":
        return list(range(1, count + 1))
    numbers: list[int] = []
    for part in item[len("blocks:") :].split(","):
        p = part.strip()
        if not is_int(p) or int(p) == 0 or abs(int(p)) > count:
            raise KdpipeError(
                f"tap {item!r}: block {p!r} is not a block number; {where} has {count} blocks, "
                f"numbered 1..{count} (negative numbers count from the last)"
            )
        n = int(p)
        numbers.append(n if n > 0 else count + 1 + n)
    return numbers


def group_items(items: list[str]) -> list[str]:
    """Re-join ``blocks:4,8,12`` after a comma split (``["blocks:4", "8", "12"]``)."""
    out: list[str] = []
    for it in items:
        if out and out[-1].startswith("blocks:") and is_int(it):
            out[-1] = f"{out[-1]},{it}"
        else:
            out.append(it)
    return out
