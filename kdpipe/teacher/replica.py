"""A differentiable PyTorch replica of the ONNX teacher (onnxruntime has no autodiff).

Built once per job with onnx2torch 1.5.x (installed with ``--no-deps``: it declares torchvision only
for its NMS/RoIAlign converters, which kdpipe does not support). Before conversion the graph's gaps
are closed with the onnx library's own tools and a few small rewrites of our own:

- ``Conv``/pool ``auto_pad`` SAME_UPPER/SAME_LOWER (jax2onnx) -> explicit ``pads`` from the inferred
  static input shape (onnx2torch refuses auto_pad);
- opset > 17 (the default torch exporter writes 18+, jax2onnx 23) -> ``onnx.version_converter`` to 17,
  the newest opset onnx2torch converts (ReduceMean-18 takes ``axes`` as an input);
- ``Gelu`` (opset 20, which the default torch exporter writes for ``nn.GELU``) has no opset-17 version,
  so the converter cannot bring it down: it is first written out as its definition,
  ``0.5 x (1 + erf(x / sqrt 2))`` (``approximate="tanh"``:
  ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``);
- ``Split`` at opset 18+ (jax2onnx) has no converter adapter down to 17: a Split with constant sizes
  (or ``num_outputs`` on a static axis) becomes one ``Slice`` per output;
- the converter's leftover ``noop_with_empty_axes`` attribute on opset-17 Reduce nodes is dropped
  (it only exists from opset 18 and means nothing when ``axes`` is given);
- ``Reshape allowzero=1`` (dynamo) is dropped when its shape is a constant without zeros (then the
  flag changes nothing);
- ``Constant`` nodes and ``Identity`` nodes of an initializer (the legacy torch exporter shares equal
  weights that way) become initializers: onnx2torch reads Conv/BN weights only from initializers.

The replica is checked against onnxruntime's logits and tap activations on the first batch
(:func:`check_replica`); an op it cannot convert is one line naming the op and the node.
"""

from __future__ import annotations

import copy
import sys
import types
import warnings
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from kdpipe.errors import KdpipeError
from kdpipe.teacher.graph import TeacherGraph, default_opset
from kdpipe.teacher.surgery import expose
from kdpipe.teacher.taps import TapInfo

TARGET_OPSET = 17  # the newest default-domain opset onnx2torch 1.5.15 converts
CHECK_RTOL = 1e-3  # replica vs onnxruntime: max |diff| <= CHECK_RTOL * max(max |ort|, 1) per tensor
UNSUPPORTED = frozenset({"NonMaxSuppression", "RoiAlign"})  # need torchvision, and have no useful gradient
_AUTO_PAD_OPS = frozenset({"Conv", "MaxPool", "AveragePool"})


def _onnx2torch() -> Any:
    """Import onnx2torch without torchvision: a stand-in module satisfies its detection-op imports
    and is removed again, so nothing else sees a fake torchvision."""
    try:
        import onnx2torch
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise KdpipeError(
                "--targets grad needs onnx2torch: pip install --no-deps onnx2torch==1.5.15 (make install "
                "does it)"
            ) from e
        stub = types.ModuleType("torchvision")
        stub.ops = types.ModuleType("torchvision.ops")  # type: ignore[attr-defined]
        stub.ops.roi_align = None  # type: ignore[attr-defined]
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, stub.ops  # type: ignore[attr-defined]
        try:
            for name in [m for m in sys.modules if m.startswith("onnx2torch")]:
                del sys.modules[name]
            import onnx2torch
        finally:
            del sys.modules["torchvision"], sys.modules["torchvision.ops"]
    return onnx2torch


def _explicit_pads(node: onnx.NodeProto, shapes: dict[str, tuple[int | None, ...]]) -> None:
    """Replace SAME_UPPER/SAME_LOWER ``auto_pad`` of ``node`` by explicit ``pads`` (in place), from the
    inferred static ``shapes`` of its input (and of a Conv's weight, when it has no kernel_shape)."""
    in_shape = shapes.get(node.input[0])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    mode = attrs.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        return
    if in_shape is None or any(d is None for d in in_shape[2:]):
        raise KdpipeError(
            f"the teacher's {node.op_type} node {node.name!r} uses auto_pad {mode} on an input of unknown "
            "size; re-export with explicit pads or a fixed input size"
        )
    spatial = [int(d) for d in in_shape[2:] if d is not None]
    kernel = list(attrs.get("kernel_shape", shapes.get(node.input[1], ())[2:] if len(node.input) > 1 else ()))
    strides = list(attrs.get("strides", [1] * len(spatial)))
    dil = list(attrs.get("dilations", [1] * len(spatial)))
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dil, strict=True):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    keep = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
    del node.attribute[:]
    node.attribute.extend([*keep, helper.make_attribute("pads", begin + end)])


def _constants(model: onnx.ModelProto, names: set[str]) -> dict[str, np.ndarray]:
    """The initializers and Constant-node outputs among ``names``, by tensor name (only those are
    decoded: the weights of a large teacher are not copied)."""

    def value(t: onnx.TensorProto) -> np.ndarray:
        try:
            return numpy_helper.to_array(t)
        except (ValueError, TypeError) as e:
            raise KdpipeError(f"teacher tensor {t.name!r} is malformed ({e}); re-export the model") from None

    out = {t.name: value(t) for t in model.graph.initializer if t.name in names}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] in names and n.attribute[:1]:
            if n.attribute[0].name == "value":
                out[n.output[0]] = value(n.attribute[0].t)
    return out


def _after_conversion(model: onnx.ModelProto) -> None:
    """Fix, in place, what onnx2torch refuses after the opset conversion (module docstring)."""
    shapes = {n.input[1] for n in model.graph.node if n.op_type == "Reshape" and n.input[1:]}
    consts = _constants(model, shapes)
    for node in model.graph.node:
        if node.op_type.startswith("Reduce") and any(a.name == "axes" for a in node.attribute):
            keep = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
            del node.attribute[:]
            node.attribute.extend(keep)
        if node.op_type == "Reshape" and any(a.name == "allowzero" and a.i == 1 for a in node.attribute):
            shape = consts.get(node.input[1])
            if shape is None or (shape == 0).any():
                raise KdpipeError(
                    f"the teacher's Reshape node {node.name!r} uses allowzero=1 with a shape that is not "
                    "a constant without zeros; onnx2torch cannot convert it for --targets grad"
                )
            keep = [a for a in node.attribute if a.name != "allowzero"]
            del node.attribute[:]
            node.attribute.extend(keep)


def _gelu_nodes(node: onnx.NodeProto, const: Any) -> list[onnx.NodeProto]:
    """The Erf (or, ``approximate="tanh"``, Tanh) formula of one ONNX ``Gelu`` node, same output name;
    ``const(value)`` gives the name of a scalar initializer in the input's dtype."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    approx = attrs.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else str(approx)
    x, y = node.input[0], node.output[0]
    tmp = [f"{y}__kdpipe_gelu_{k}" for k in range(8)]
    mk = helper.make_node
    if approx == "tanh":
        inner = [
            mk("Mul", [x, x], [tmp[0]]),
            mk("Mul", [tmp[0], x], [tmp[1]]),
            mk("Mul", [tmp[1], const(0.044715)], [tmp[2]]),
            mk("Add", [x, tmp[2]], [tmp[3]]),
            mk("Mul", [tmp[3], const(float(np.sqrt(2.0 / np.pi)))], [tmp[4]]),
            mk("Tanh", [tmp[4]], [tmp[5]]),
        ]
    elif approx == "none":
        inner = [
            mk("Mul", [x, const(float(1.0 / np.sqrt(2.0)))], [tmp[4]]),
            mk("Erf", [tmp[4]], [tmp[5]]),
        ]
    else:
        raise KdpipeError(
            f"the teacher's Gelu node {node.name!r} has approximate={approx!r} (not none or tanh)"
        )
    return [
        *inner,
        mk("Add", [tmp[5], const(1.0)], [tmp[6]]),
        mk("Mul", [x, tmp[6]], [tmp[7]]),
        mk("Mul", [tmp[7], const(0.5)], [y], name=node.name),
    ]


def _decompose_gelu(model: onnx.ModelProto, elem_types: dict[str, int]) -> None:
    """Write each default-domain ``Gelu`` node of ``model`` out as its formula (in place; module
    docstring): onnx.version_converter has no opset-17 form of it."""
    g = model.graph
    if not any(n.op_type == "Gelu" and n.domain in ("", "ai.onnx") for n in g.node):
        return
    made: dict[tuple[int, float], str] = {}

    def const(elem: int, value: float) -> str:
        if (elem, value) not in made:
            name = f"__kdpipe_gelu_const_{len(made)}"
            dtype = helper.tensor_dtype_to_np_dtype(elem)
            g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
            made[elem, value] = name
        return made[elem, value]

    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        if node.op_type == "Gelu" and node.domain in ("", "ai.onnx"):
            elem = elem_types.get(node.input[0], onnx.TensorProto.FLOAT)
            nodes += _gelu_nodes(node, lambda v, e=elem: const(e, v))
        else:
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)


def _split_sizes(node: onnx.NodeProto, consts: dict[str, np.ndarray], dim: int | None) -> list[int] | None:
    """The output sizes of a ``Split`` node: its constant ``split`` input, else ``num_outputs`` over a
    static axis of size ``dim`` (ceil(dim / n) each, the last one smaller: Split-18); None if unknown."""
    if len(node.input) > 1 and node.input[1]:
        sizes = consts.get(node.input[1])
        return None if sizes is None else [int(v) for v in np.asarray(sizes).reshape(-1)]
    n = next((int(a.i) for a in node.attribute if a.name == "num_outputs"), len(node.output))
    if dim is None or n < 1:
        return None
    step = -(-dim // n)
    return [max(0, min(step, dim - k * step)) for k in range(n)]


def _split_as_slices(model: onnx.ModelProto, shapes: dict[str, tuple[int | None, ...]]) -> None:
    """Each default-domain ``Split`` of ``model`` with known sizes becomes one Slice per output (in place;
    module docstring); others stay (the opset conversion then names them)."""
    g = model.graph
    if not any(n.op_type == "Split" for n in g.node):
        return
    consts = _constants(model, {n.input[1] for n in g.node if n.op_type == "Split" and len(n.input) > 1})
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        if node.op_type != "Split" or node.domain not in ("", "ai.onnx") or not all(node.output):
            nodes.append(node)
            continue
        shape = shapes.get(node.input[0])
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 0)
        if shape is not None and axis < 0:
            axis += len(shape)
        dim = shape[axis] if shape is not None and 0 <= axis < len(shape) else None
        sizes = _split_sizes(node, consts, dim)
        if sizes is None or len(sizes) != len(node.output):
            nodes.append(node)
            continue
        bounds = np.cumsum([0, *sizes])
        for k, out in enumerate(node.output):
            names = [f"{out}__kdpipe_split_{what}" for what in ("starts", "ends", "axes")]
            for name, v in zip(names, (bounds[k], bounds[k + 1], axis), strict=True):
                g.initializer.append(numpy_helper.from_array(np.asarray([v], np.int64), name))
            nodes.append(helper.make_node("Slice", [node.input[0], *names], [out], name=f"{node.name}_{k}"))
    del g.node[:]
    g.node.extend(nodes)


def _constants_as_initializers(model: onnx.ModelProto) -> None:
    """Constant nodes, and Identity nodes of an initializer or constant, become initializers (in place;
    graph outputs stay nodes)."""
    g = model.graph
    outputs = {o.name for o in g.output}
    values = {t.name: t for t in g.initializer}
    keep = []
    for node in g.node:
        value = None
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            value = node.attribute[0].t
        elif node.op_type == "Identity" and node.input[0] in values:
            value = values[node.input[0]]
        if value is None or node.output[0] in outputs:
            keep.append(node)
            continue
        init = copy.deepcopy(value)
        init.name = node.output[0]
        values[init.name] = init
        g.initializer.append(init)
    del g.node[:]
    g.node.extend(keep)


def close_gaps(
    model: onnx.ModelProto,
    shapes: dict[str, tuple[int | None, ...]],
    elem_types: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` (shapes inferred; ``elem_types``: tensor element types, float32 where
    missing) that onnx2torch converts: see the module docstring."""
    m = copy.deepcopy(model)
    _constants_as_initializers(m)
    _decompose_gelu(m, elem_types or {})
    for node in m.graph.node:
        if node.op_type in _AUTO_PAD_OPS:
            _explicit_pads(node, shapes)
    if default_opset(m) > TARGET_OPSET:
        _split_as_slices(m, shapes)
        try:
            m = onnx.version_converter.convert_version(m, TARGET_OPSET)
        except Exception as e:  # onnx raises several types; the adapter that failed is in the message
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise KdpipeError(
                f"onnx.version_converter cannot bring the teacher from opset {default_opset(model)} to "
                f"{TARGET_OPSET} for --targets grad ({first}); re-export with opset {TARGET_OPSET}"
            ) from e
    _after_conversion(m)
    return m


def _unconvertible(model: onnx.ModelProto, o2t: Any, cause: BaseException) -> KdpipeError:
    """The one-line error naming the first node onnx2torch cannot convert (found node by node)."""
    from onnx2torch.node_converters import get_converter
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.utils.safe_shape_inference import safe_shape_inference

    opsets = {o.domain: o.version for o in model.opset_import}
    graph = OnnxGraph(safe_shape_inference(model).graph)
    for node in graph.nodes.values():
        proto = node.proto
        what = f"{proto.op_type} node {proto.name or node.unique_name!r} (opset {opsets.get(node.domain)})"
        reason = None
        if proto.op_type in UNSUPPORTED:
            reason = "detection ops have no input gradient kdpipe supports"
        else:
            try:
                convert = get_converter(
                    domain=node.domain, operation_type=proto.op_type, version=opsets[node.domain]
                )
            except NotImplementedError:
                reason = "onnx2torch 1.5.15 has no converter for it"
                convert = None
            try:
                if convert is not None:
                    convert(node, graph)
            except Exception as e:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if reason is not None:
            return KdpipeError(
                f"the teacher's {what} cannot be made differentiable for --targets grad ({reason}); "
                "docs/methods.md lists the supported ops"
            )
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
    return KdpipeError(f"onnx2torch cannot convert the teacher for --targets grad ({first})")


class Replica(torch.nn.Module):
    """The teacher as a differentiable torch function of its model input.

    ``forward(x)`` takes the model input (B, C, H, W) or (B, H, W, C) as the ONNX graph does and
    returns a dict: ``"logits"`` (B, K) and each exposed tensor by its ONNX name (e.g. the taps).
    Weights are frozen (``requires_grad=False``) and in eval mode; ``.double()`` gives a float64 replica.
    A float16/bfloat16 graph gets a float32 replica (of its rounded weights), fed float32 inputs.
    """

    def __init__(self, module: torch.nn.Module, outputs: list[str], logits_name: str) -> None:
        super().__init__()
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.outputs = outputs
        self.logits_name = logits_name

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():  # onnx2torch's Slice warns about its own indexing
            warnings.simplefilter("ignore", UserWarning)
            vals = self.module(x)
        vals = vals if isinstance(vals, tuple | list) else (vals,)
        out = dict(zip(self.outputs, vals, strict=True))
        out["logits"] = out[self.logits_name]
        return out


def build_replica(graph: TeacherGraph, taps: list[TapInfo] | None = None) -> Replica:
    """The replica of ``graph`` with the ``taps`` as extra outputs; KdpipeError (one line) when a node
    cannot be converted."""
    names = [t.name for t in taps or []]
    model = close_gaps(expose(graph.model, names, graph.elem_types), graph.shapes, graph.elem_types)
    o2t = _onnx2torch()
    if any(n.op_type in UNSUPPORTED for n in model.graph.node):
        raise _unconvertible(model, o2t, NotImplementedError("detection op"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = o2t.convert(model)
    except KdpipeError:
        raise
    except Exception as e:  # NotImplementedError, KeyError, ... from a converter
        raise _unconvertible(model, o2t, e) from e
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors):
        module = module.float()  # half weights next to float32 biases do not run; J_T is float32 anyway
    return Replica(module, [o.name for o in model.graph.output], graph.logits_name)


def _ort_outputs(graph: TeacherGraph, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    from kdpipe.teacher.runner import make_session

    model = expose(graph.model, names, graph.elem_types)
    sess = make_session(model.SerializeToString(), "cpu", 1, False)
    feed = np.ascontiguousarray(x, dtype=np.dtype(graph.input.dtype))  # e.g. a float16 teacher
    return list(sess.run(names, {graph.input.name: feed}))


def check_replica(replica: Replica, graph: TeacherGraph, taps: list[TapInfo], x: np.ndarray) -> float:
    """Compare the replica with onnxruntime on the model input ``x`` (float32, the model's layout):
    logits and every tap. Returns the worst relative difference; KdpipeError names the worst tensor
    when it exceeds ``CHECK_RTOL``."""
    names = [graph.logits_name, *(t.name for t in taps)]
    want = _ort_outputs(graph, names, x)
    with torch.no_grad():
        got = replica(torch.from_numpy(np.ascontiguousarray(x)))
    worst, where = 0.0, ""
    for name, ref in zip(names, want, strict=True):
        mine = got[name].detach().double().numpy()
        if mine.shape != ref.shape:
            raise KdpipeError(
                f"the teacher's PyTorch replica gives {name!r} the shape {mine.shape}, onnxruntime "
                f"{ref.shape}; the graph cannot be used for --targets grad"
            )
        err = float(np.abs(mine - ref).max(initial=0.0)) / max(float(np.abs(ref).max(initial=0.0)), 1.0)
        if not np.isfinite(err) or err > worst:
            worst, where = (float("inf") if not np.isfinite(err) else err), name
    if worst > CHECK_RTOL:
        raise KdpipeError(
            f"the teacher's PyTorch replica differs from onnxruntime on the first batch: {where!r} by "
            f"{worst:.3g} of its scale (tolerance {CHECK_RTOL:g}); --targets grad cannot use this graph"
        )
    return worst
