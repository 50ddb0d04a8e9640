"""Run the teacher with onnxruntime and return its distillation targets per batch.

Two reduce modes give the same targets:
- ``graph``: the attention maps and pooled vectors are computed inside the ONNX graph
  (:mod:`kdpipe.teacher.surgery`), so only the small targets leave onnxruntime;
- ``native``: the raw tap activations are graph outputs, reduced by ``kdpipe.ops.tap_targets``.
DCT targets are computed from the attention maps (their per-sample min-max normalisation makes the
map's L2 normalisation irrelevant): in the graph as small matrix products (``graph``), or with
``kdpipe.ops.dct_targets`` (``native``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnxruntime as ort

from kdpipe import ops
from kdpipe.errors import KdpipeError
from kdpipe.teacher.graph import TeacherGraph
from kdpipe.teacher.outliers import check_clip, clip_maps
from kdpipe.teacher.spec import TeacherSpec
from kdpipe.teacher.surgery import append_reductions, expose
from kdpipe.teacher.taps import TapInfo
from kdpipe.teacher.vit_surgery import append_attention, grid_views

TARGET_KINDS = ("logits", "at", "pooled", "dct", "attn")
PROVIDERS = ("auto", "cpu", "cuda")
REDUCE_MODES = ("graph", "native")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def _session_options(threads: int | None, spinning: bool) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors reach the user as one KdpipeError line, not as C++ log lines
    if threads is not None and threads < 1:
        raise KdpipeError(f"teacher threads must be >= 1, got {threads}")
    # onnxruntime's own default counts the node's physical cores and ignores the CPU binding: a job
    # given 4 CPUs of a 64-core node would run 64 threads on 4 CPUs
    so.intra_op_num_threads = int(threads) if threads is not None else ops.allowed_cpus()
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def make_session(
    model_bytes: bytes, provider: str, threads: int | None, spinning: bool
) -> ort.InferenceSession:
    """An InferenceSession on the requested provider; ``auto`` = CUDA when it really loads, else CPU.

    onnxruntime-gpu lists CUDA as available where it cannot load; the providers a session actually
    got are checked instead.
    """
    if provider not in PROVIDERS:
        raise KdpipeError(f"unknown teacher provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    so = _session_options(threads, spinning)
    if provider in ("auto", "cuda") and _CUDA in ort.get_available_providers():
        try:
            sess = ort.InferenceSession(model_bytes, so, providers=[_CUDA, _CPU])
        except Exception as e:
            if provider == "cuda":
                raise KdpipeError(
                    f"onnxruntime could not start a CUDA session ({e}); use --provider cpu"
                ) from e
            sess = None
        if sess is not None and _CUDA in sess.get_providers():
            return sess
    if provider == "cuda":
        raise KdpipeError(
            "onnxruntime cannot use CUDA here (onnxruntime-gpu missing, or no GPU/CUDA libraries); "
            "use --provider cpu or auto"
        )
    try:
        return ort.InferenceSession(model_bytes, so, providers=[_CPU])
    except Exception as e:  # onnxruntime raises its own types (Fail, InvalidGraph, ...) for bad models
        detail = _first_line(e)
        raise KdpipeError(f"onnxruntime cannot load the teacher ({detail}); re-export the model") from e


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (onnxruntime's can span many), at most 300 characters."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


class TeacherRunner:
    """The teacher as a function from a float32 input batch to its targets.

    ``run(x)`` returns float32 arrays keyed by cache array names: ``logits`` (B, K), ``at.{i}``
    (B, H_i, W_i), ``pooled.{i}`` (B, C_i), ``dct.{variant}.{i}`` (B, H_i, W_i), ``attn.{i}`` (B, h_i,
    w_i), for the requested ``targets`` (a subset of "logits", "at", "pooled", "dct", "attn"); ``i``
    indexes ``taps``. Token taps ("NLC", transformers) give their targets on the patch grid, the extra
    tokens dropped inside the graph (:mod:`kdpipe.teacher.vit_surgery`); ``token_clip`` clips their
    maps at a per-sample quantile (:mod:`kdpipe.teacher.outliers`).
    ``output_names`` lists those keys; ``providers`` the execution providers the session really uses.
    A teacher with a batch fixed at 1 is run one sample at a time. ``io_binding`` (default: on CUDA)
    binds the input and outputs through an onnxruntime IOBinding.
    """

    def __init__(
        self,
        graph: TeacherGraph,
        taps: list[TapInfo],
        spec: TeacherSpec | None,
        targets: Iterable[str],
        provider: str = "auto",
        threads: int | None = None,
        reduce: str = "graph",
        dct_variants: Iterable[str] = ("dft-abs",),
        spinning: bool = True,
        io_binding: bool | None = None,
        token_clip: float | None = None,
    ) -> None:
        check_clip(token_clip)
        self.token_clip = token_clip
        self.graph = graph
        self.taps = list(taps)
        self.spec = spec
        self.targets = set(targets)
        bad = self.targets - set(TARGET_KINDS)
        if bad:
            raise KdpipeError(f"unknown target kinds {sorted(bad)}; choose from {', '.join(TARGET_KINDS)}")
        if reduce not in REDUCE_MODES:
            raise KdpipeError(f"unknown reduce mode {reduce!r}; choose graph or native")
        self.reduce = reduce
        self.dct_variants = tuple(dct_variants) if "dct" in self.targets else ()
        bad_v = [v for v in self.dct_variants if v not in ops.DCT_VARIANTS]
        if bad_v:
            raise KdpipeError(f"unknown DCT variants {bad_v}; choose from {', '.join(ops.DCT_VARIANTS)}")
        if (self.targets - {"logits"}) and not self.taps:
            raise KdpipeError(f"targets {sorted(self.targets - {'logits'})} need taps; none were given")
        if spec is not None and spec.layout != graph.input.layout:
            raise KdpipeError(
                f"teacher spec layout {spec.layout} differs from the model input {graph.input.layout}"
            )
        self._need_at = bool(self.targets & {"at", "dct"})
        self._need_pooled = "pooled" in self.targets
        taps_needed = self._need_at or self._need_pooled

        self._attn: dict[str, str] = {}
        model = graph.model
        if "attn" in self.targets:  # always in the graph: the Softmax is larger than the tokens
            model, self._attn = append_attention(model, graph.opset, self.taps, graph.elem_types)
        # token taps (B, T, C) become their (B, h, w, C) patch grids inside the graph
        model, self._grid_taps, types = grid_views(model, graph.opset, self.taps, graph.elem_types)
        self._reduced: dict[str, str] = {}
        self._raw: list[str] = []
        if taps_needed and reduce == "graph":
            clip = token_clip is not None  # then the maps are clipped, and DCT made from them, on the host
            model, self._reduced = append_reductions(
                model,
                graph.opset,
                self._grid_taps,
                types,
                "at" in self.targets or (clip and self._need_at),
                self._need_pooled,
                () if clip else self.dct_variants,
            )
        elif taps_needed:
            self._raw = [t.name for t in self._grid_taps]
            model = expose(model, self._raw, types)
        names = ([graph.logits_name] if "logits" in self.targets else []) + list(self._reduced.values())
        names += list(self._attn.values())
        names += [r for r in self._raw if r not in names]
        self._names = names
        self.session = make_session(model.SerializeToString(), provider, threads, spinning)
        self.providers: list[str] = list(self.session.get_providers())
        self.io_binding = (_CUDA in self.providers) if io_binding is None else bool(io_binding)
        self._in_dtype = np.dtype(graph.input.dtype)
        keys = ["logits"] if "logits" in self.targets else []
        for i in range(len(self.taps)):
            keys += [f"at.{i}"] if "at" in self.targets else []
            keys += [f"pooled.{i}"] if self._need_pooled else []
            keys += [f"dct.{v}.{i}" for v in self.dct_variants]
            keys += [f"attn.{i}"] if "attn" in self.targets else []
        self.output_names: list[str] = keys

    def _session_run(self, x: np.ndarray) -> list[np.ndarray]:
        feed = np.ascontiguousarray(x, dtype=self._in_dtype)
        try:
            if not self.io_binding:
                return list(self.session.run(self._names, {self.graph.input.name: feed}))
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.graph.input.name, feed)
            for name in self._names:
                binding.bind_output(name)
            self.session.run_with_iobinding(binding)
            return list(binding.copy_outputs_to_cpu())
        except Exception as e:  # a model that loads but cannot run its own input
            raise KdpipeError(
                f"the teacher fails on an input batch of shape {feed.shape} ({_first_line(e)}); "
                "check the model and its input size"
            ) from e

    def _forward(self, x: np.ndarray) -> list[np.ndarray]:
        if not self.graph.fixed_batch or x.shape[0] == 1:
            return self._session_run(x)
        parts = [self._session_run(x[i : i + 1]) for i in range(x.shape[0])]  # fixed batch of 1
        return [np.concatenate(col, axis=0) for col in zip(*parts, strict=True)]

    def _origin(self, name: str) -> str:
        """The graph tensor (a tap or the logits) that session output ``name`` comes from."""
        keyed = {**self._reduced, **self._attn}
        key = next((k for k, v in keyed.items() if v == name), None)
        if key is None:
            grid = next((i for i, t in enumerate(self._grid_taps) if t.name == name), None)
            return name if grid is None else self.taps[grid].name
        return self.taps[int(key.rsplit(".", 1)[1])].name

    def _check_batch(self, vals: dict[str, np.ndarray], batch: int) -> None:
        """A tap whose batch is folded into axis 0 ((B*T, C, H, W): static shape inference calls its
        axis 0 unknown, like a batch) gives B*T rows: refused here, before its targets are built."""
        for name, v in vals.items():
            if v.ndim == 0 or v.shape[0] != batch:
                rows = v.shape[0] if v.ndim else 0
                raise KdpipeError(
                    f"teacher tensor {self._origin(name)!r} gives {rows} rows for an input batch of {batch}: "
                    "its axis 0 is not the batch (folded or moved); choose other taps with --taps "
                    "(`kdpipe inspect` lists them)"
                )

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Targets of one input batch ``x`` (float32, the model's input shape and layout)."""
        expect = [d for d in self.graph.input.shape[1:]]
        if x.ndim != 4 or any(e is not None and e != s for e, s in zip(expect, x.shape[1:], strict=True)):
            raise KdpipeError(f"teacher input batch has shape {x.shape}; the model expects (B, {expect})")
        vals = dict(zip(self._names, self._forward(x), strict=True))
        self._check_batch(vals, x.shape[0])
        out: dict[str, np.ndarray] = {}
        if "logits" in self.targets:
            out["logits"] = np.asarray(vals[self.graph.logits_name], dtype=np.float32)
        maps: dict[int, np.ndarray] = {}
        for key, name in self._attn.items():
            out[key] = np.asarray(vals[name], dtype=np.float32)
        if self.reduce == "graph":  # every target, DCT included, comes out of the graph
            for key, name in self._reduced.items():
                out[key] = np.asarray(vals[name], dtype=np.float32)
            if self.token_clip is None:
                return out
            maps = {i: out.pop(f"at.{i}") for i in range(len(self.taps)) if f"at.{i}" in out}
        if self._raw:
            for i, tap in enumerate(self._grid_taps):
                at, pooled = ops.tap_targets(vals[tap.name], channel_axis=tap.channel_axis)
                if self._need_at:
                    maps[i] = at
                if self._need_pooled:
                    out[f"pooled.{i}"] = pooled
        if self.token_clip is not None:  # outlier tokens: clip the token taps' maps (teacher/outliers.py)
            maps = {i: clip_maps(m, self.token_clip) if self.taps[i].layout == "NLC" else m
                    for i, m in maps.items()}  # fmt: skip
        for i, m in maps.items():
            for v in self.dct_variants:
                out[f"dct.{v}.{i}"] = ops.dct_targets(m, v)
        if "at" in self.targets:
            for i, m in maps.items():
                out[f"at.{i}"] = m
        else:
            for i in maps:
                out.pop(f"at.{i}", None)
        return out
