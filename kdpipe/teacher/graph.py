"""Load a teacher ONNX file: validate it, find its image input and logits, infer intermediate shapes.

The batch axis: a symbolic batch is kept; a batch fixed at 1 is made symbolic when a batch of 2 runs
and gives the same logits as two batches of 1 (graphs with a hard-coded ``Reshape`` to ``[1, ...]``
fail this); otherwise the teacher runs one sample at a time and ``TeacherGraph.batch_message`` says so.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, shape_inference
from onnx.external_data_helper import load_external_data_for_model

from kdpipe.errors import KdpipeError

# Highest default-domain opset the pinned onnxruntime (1.2x-1.31) executes.
MAX_OPSET = 23
BATCH_DIM = "batch"

Shape = tuple[int | None, ...]


@dataclass(frozen=True)
class InputInfo:
    """The teacher's image input. ``batch`` is None for a symbolic batch, else the fixed size (1)."""

    name: str
    layout: str  # "NCHW" | "NHWC"
    channels: int
    height: int | None
    width: int | None
    dtype: str  # numpy dtype name of the input tensor, e.g. "float32"
    batch: int | None

    @property
    def shape(self) -> tuple[Any, ...]:
        """The input shape with ``"batch"`` for a symbolic batch, in the input's own layout."""
        b: Any = BATCH_DIM if self.batch is None else self.batch
        if self.layout == "NCHW":
            return (b, self.channels, self.height, self.width)
        return (b, self.height, self.width, self.channels)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form for the cache manifest."""
        return {
            "name": self.name,
            "layout": self.layout,
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "dtype": self.dtype,
            "batch": self.batch,
        }


@dataclass
class TeacherGraph:
    """A loaded teacher: the model with inferred shapes plus what kdpipe needs to know about it.

    ``shapes`` maps every tensor name to its dims (None where unknown; dim 0 of activations is the
    batch), ``elem_types`` to its ONNX element type.
    """

    path: str
    sha256: str
    model: onnx.ModelProto
    input: InputInfo
    logits_name: str
    num_classes: int
    opset: int
    batch_message: str | None = None
    shapes: dict[str, Shape] = field(default_factory=dict)
    elem_types: dict[str, int] = field(default_factory=dict)

    @property
    def fixed_batch(self) -> bool:
        """True when the teacher must run one sample at a time."""
        return self.input.batch is not None

    def taps_candidates(self) -> list[Any]:
        """All 4-D activations that can be tapped, in graph order, with ``auto`` marking the auto picks."""
        from kdpipe.teacher.taps import candidates

        return candidates(self)


def _external_files(model: onnx.ModelProto) -> list[str]:
    """Relative paths of the external-data files the model's initializers point to, sorted."""
    files: set[str] = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files.update(e.value for e in t.external_data if e.key == "location")
    return sorted(files)


def _sha256(path: str, external_files: list[str]) -> str:
    """SHA-256 of the .onnx file, followed by each external-data file (name, then bytes) it uses.

    Without external data this is the plain file hash. With it (the dynamo exporter writes weights to
    ``NAME.onnx.data``), the weights are part of the hash: two teachers that differ only in weights
    must not share a cache.
    """
    h = hashlib.sha256()
    base = os.path.dirname(path)
    external = [(os.path.join(base, n), n.encode("utf-8") + b"\0") for n in external_files]
    for fname, label in [(path, b""), *external]:
        h.update(label)
        with open(fname, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _dims(t: onnx.TypeProto) -> Shape | None:
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim)


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset version."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop stored value_info (some exporters write wrong shapes) and re-run ONNX shape inference."""
    m = copy.deepcopy(model)
    del m.graph.value_info[:]
    try:
        return shape_inference.infer_shapes(m, data_prop=True)
    except Exception as e:  # onnx raises several types here
        raise KdpipeError(f"ONNX shape inference failed on the teacher ({e}); re-export the model") from e


def collect_types(model: onnx.ModelProto) -> tuple[dict[str, Shape], dict[str, int]]:
    """Shapes and element types of every typed tensor (inputs, value_info, outputs, initializers)."""
    shapes: dict[str, Shape] = {}
    types: dict[str, int] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        d = _dims(vi.type)
        if d is not None:
            shapes[vi.name] = d
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
        types[init.name] = init.data_type
    return shapes, types


def _check_file(path: str) -> tuple[onnx.ModelProto, list[str]]:
    """The model (external data loaded) and the external-data files it uses."""
    if not os.path.isfile(path):
        raise KdpipeError(f"teacher file {path!r} does not exist; give the path to an .onnx file")
    try:
        model = onnx.load(path, load_external_data=False)
        external = _external_files(model)
        if external:
            load_external_data_for_model(model, os.path.dirname(path))
    except Exception as e:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        hint = (
            "keep the external weights file next to the .onnx file"
            if "external" in detail.lower() or "should be stored in" in detail
            else "the file may be truncated or not ONNX: re-export it"
        )
        raise KdpipeError(
            f"teacher file {path!r} is not a readable ONNX model ({type(e).__name__}"
            f"{': ' + detail if detail else ''}); {hint}"
        ) from e
    if model.ir_version <= 0 or len(model.graph.node) == 0 or len(model.graph.output) == 0:
        raise KdpipeError(f"teacher file {path!r} is not an ONNX model (no graph found); re-export it")
    opset = default_opset(model)
    if opset == 0:
        raise KdpipeError(f"teacher {path!r} imports no default (ai.onnx) opset; re-export it")
    if opset > MAX_OPSET:
        raise KdpipeError(
            f"teacher {path!r} uses ONNX opset {opset} but onnxruntime here supports up to {MAX_OPSET}; "
            f"re-export with opset <= {MAX_OPSET}"
        )
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KdpipeError(f"teacher {path!r} is not a valid ONNX model: {first}; re-export it") from e
    return model, external


def _is_small(d: int | None) -> bool:
    return d is not None and 1 <= d <= 4


def _find_input(model: onnx.ModelProto, path: str) -> tuple[onnx.ValueInfoProto, str]:
    inits = {i.name for i in model.graph.initializer}
    real = [vi for vi in model.graph.input if vi.name not in inits]
    images = []
    for vi in real:
        d = _dims(vi.type)
        if d is not None and len(d) == 4 and (_is_small(d[1]) or _is_small(d[3])):
            images.append(vi)
    if not images:
        desc = ", ".join(f"{vi.name} {_dims(vi.type)}" for vi in real) or "none"
        raise KdpipeError(
            f"teacher {path!r} has no image-like 4-D input (NCHW or NHWC with 1-4 channels); inputs: {desc}"
        )
    vi = images[0]
    if len(real) > 1:
        others = ", ".join(v.name for v in real if v.name != vi.name)
        raise KdpipeError(
            f"teacher {path!r} has extra inputs besides {vi.name!r} ({others}); export it with one"
        )
    d = _dims(vi.type)
    assert d is not None
    consumers = [n for n in model.graph.node if vi.name in n.input]
    perms = [
        tuple(a.ints) for n in consumers if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"
    ]
    if (0, 3, 1, 2) in perms:
        layout = "NHWC"
    elif any(n.op_type == "Conv" for n in consumers) and _is_small(d[1]):
        layout = "NCHW"
    elif _is_small(d[1]) and not _is_small(d[3]):
        layout = "NCHW"
    elif _is_small(d[3]) and not _is_small(d[1]):
        layout = "NHWC"
    else:
        layout = "NCHW"
    return vi, layout


def _elem_np(elem_type: int) -> str:
    """NumPy dtype name of an ONNX element type; KdpipeError for UNDEFINED and unknown codes."""
    try:
        return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        raise KdpipeError(
            f"teacher input has ONNX element type {elem_type}, which has no NumPy type; "
            "re-export the model with a float32 input"
        ) from None


def _set_batch(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto:
    m = copy.deepcopy(model)
    for vi in [v for v in m.graph.input if v.name == input_name] + list(m.graph.output):
        if vi.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape.dim
            if len(dims) > 0 and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
                dims[0].dim_param = BATCH_DIM
    return infer_shapes(m)


def _dummy(info: InputInfo, batch: int, seed: int = 0) -> np.ndarray:
    shape = list(info.shape)
    shape[0] = batch
    return np.random.default_rng(seed).standard_normal(shape).astype(info.dtype)


def _batch_works(model: onnx.ModelProto, info: InputInfo, logits: str) -> bool:
    """Run a batch of 2 and two batches of 1 of the same data; True when the logits agree."""
    import onnxruntime as ort

    try:
        so = ort.SessionOptions()
        so.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        x = _dummy(info, 2)
        (y2,) = sess.run([logits], {info.name: x})
        y1 = np.concatenate([sess.run([logits], {info.name: x[i : i + 1]})[0] for i in range(2)])
    except Exception:
        return False
    if y2.shape != y1.shape:
        return False
    return bool(np.allclose(y2.astype(np.float64), y1.astype(np.float64), rtol=1e-3, atol=1e-4))


def _complete_shapes(graph: TeacherGraph) -> None:
    """Fill in the shapes that shape inference left unknown, by onnxruntime runs on dummy batches of 1
    and 2: the second shows which axis is the batch (a sequence-first (T, B, C) tensor has it at axis
    1, and is left unknown, as are a tensor without one and one with the batch folded into axis 0), so
    what this records as (None, ...) is batch-first. Shapes from static inference are kept as they
    are: there an unknown axis 0 may also be a folded batch."""
    unknown = [
        name
        for node in graph.model.graph.node
        for name in node.output
        if name
        and graph.elem_types.get(name) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        and (graph.shapes.get(name) is None or any(d is None for d in graph.shapes[name][1:]))
    ]
    if not unknown:
        return
    import onnxruntime as ort

    m = copy.deepcopy(graph.model)
    present = {o.name for o in m.graph.output}
    for name in unknown:
        if name not in present:
            m.graph.output.append(helper.make_tensor_value_info(name, graph.elem_types[name], None))
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 4
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        vals = sess.run(unknown, {graph.input.name: _dummy(graph.input, 1)})
    except Exception:
        return  # leave them unknown: they simply are not offered as taps
    twos = None  # a teacher whose batch is fixed at 1 runs one size only: axis 0 is taken as the batch
    if graph.input.batch != 1:
        with contextlib.suppress(Exception):
            twos = sess.run(unknown, {graph.input.name: _dummy(graph.input, 2)})
    for i, (name, v) in enumerate(zip(unknown, vals, strict=True)):
        if v.ndim == 0:
            graph.shapes[name] = ()
        elif twos is None or (v.shape[0] == 1 and twos[i].shape == (2, *v.shape[1:])):  # not (B*T, ...)
            graph.shapes[name] = (None, *v.shape[1:])
        # else the batch is not axis 0 (or the tensor has none): left unknown, so never offered as a tap


def load_teacher(path: str, input_size: tuple[int, int] | None = None) -> TeacherGraph:
    """Load and check a teacher ONNX file.

    ``input_size`` (H, W) fixes symbolic spatial input dims (needed to know the taps' shapes).
    Raises KdpipeError for a missing/truncated/invalid file, an opset onnxruntime cannot run, no
    image-like input, or no 2-D (batch, classes) output.
    """
    path = os.fspath(path)
    model, external = _check_file(path)
    vi, layout = _find_input(model, path)
    d = _dims(vi.type)
    assert d is not None
    hw_axes = (2, 3) if layout == "NCHW" else (1, 2)
    if input_size is not None:
        for ax, size in zip(hw_axes, input_size, strict=True):
            dim = next(v for v in model.graph.input if v.name == vi.name).type.tensor_type.shape.dim[ax]
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise KdpipeError(
                    f"input size {tuple(input_size)} does not match the teacher input {vi.name!r} {d}; "
                    "drop --input-size or give the model's size"
                )
            dim.dim_value = int(size)
        d = _dims(next(v for v in model.graph.input if v.name == vi.name).type)
        assert d is not None
    elem = vi.type.tensor_type.elem_type
    chan = d[1] if layout == "NCHW" else d[3]
    assert chan is not None
    info = InputInfo(
        name=vi.name,
        layout=layout,
        channels=int(chan),
        height=d[hw_axes[0]],
        width=d[hw_axes[1]],
        dtype=_elem_np(elem),
        batch=d[0],
    )
    inferred = infer_shapes(model)
    shapes, types = collect_types(inferred)
    logits = [o.name for o in inferred.graph.output if len(shapes.get(o.name, ())) == 2]
    if not logits:
        outs = ", ".join(f"{o.name} {shapes.get(o.name)}" for o in inferred.graph.output)
        raise KdpipeError(f"teacher {path!r} has no 2-D (batch, classes) logits output; outputs: {outs}")
    logits_name = logits[0]
    k = shapes[logits_name][1]
    if k is None:
        raise KdpipeError(f"teacher {path!r}: the number of classes of output {logits_name!r} is not static")

    message = None
    if info.batch == 1:
        try:
            flexible = _set_batch(model, info.name)
        except KdpipeError:
            flexible = None
        if flexible is not None and _batch_works(
            flexible, InputInfo(**{**info.__dict__, "batch": None}), logits_name
        ):
            inferred = flexible
            shapes, types = collect_types(inferred)
            info = InputInfo(**{**info.__dict__, "batch": None})
            message = "the teacher's batch was fixed at 1; made it symbolic (checked with a batch of 2)"
        else:
            message = (
                "the teacher's batch is fixed at 1 and cannot be made symbolic (a batch of 2 fails or "
                "mixes samples); running it one sample at a time (slow): re-export with a dynamic batch"
            )
    elif info.batch is not None:
        raise KdpipeError(
            f"teacher input {info.name!r} has a fixed batch of {info.batch}; re-export with a dynamic batch"
        )
    graph = TeacherGraph(
        path=path,
        sha256=_sha256(path, external),
        model=inferred,
        input=info,
        logits_name=logits_name,
        num_classes=int(k),
        opset=default_opset(model),
        batch_message=message,
        shapes=shapes,
        elem_types=types,
    )
    _complete_shapes(graph)
    return graph
