"""`kdpipe cache verify PATH --live N`: re-run the teacher on N random (sample, view) pairs of a cache.

Checksums prove that the bytes are the ones the writer wrote; they cannot prove that the writer wrote
the teacher's targets (a cache built on someone else's cluster, with another teacher file, another
onnxruntime, a bug). This check rebuilds each chosen view from the dataset and the stored view
parameters, runs the teacher with onnxruntime exactly as `cache-teacher` does (same taps, same
preprocessing, targets reduced in the graph), and compares the result with the stored values.

Tolerance, per element: ``|stored - live| <= rtol * max(|live|, 0.01 * max|live of that item|)``
with ``rtol`` the storage dtype's rounding plus room for onnxruntime's batch-size differences:
float32 1e-4, float16 1e-3 (rounding 2**-11 = 4.9e-4), bfloat16 8e-3 (rounding 2**-8 = 3.9e-3).
The floor keeps near-zero entries of a map from failing on absolute noise; float16 adds half its
subnormal spacing (2**-25 = 3e-8), its rounding of values below 6.1e-5 (most input gradients).
The ``grad`` target (input gradients) is recomputed through the teacher's PyTorch replica, as
cache-teacher computes it, with each sample's true label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.errors import KdpipeError

RTOL = {"float32": 1e-4, "float16": 1e-3, "bfloat16": 8e-3}
ABS = {"float16": 2.0**-25}  # half of float16's subnormal spacing
FLOOR = 0.01


@dataclass
class KindReport:
    """The comparison of one target kind (logits, at, dct, pooled) over all its arrays."""

    kind: str
    dtype: str
    max_abs_diff: float = 0.0
    worst: float = 0.0  # largest |diff| / allowed (> 1: beyond tolerance)
    arrays: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.worst <= 1.0


@dataclass
class LiveReport:
    """What ``live_check`` found."""

    pairs: int
    teacher: str
    teacher_matches: bool  # the teacher file's sha256 equals the one recorded in the manifest
    kinds: list[KindReport]
    problems: list[str]  # labels or view parameters that do not match the dataset / the view policy

    @property
    def ok(self) -> bool:
        return not self.problems and all(k.ok for k in self.kinds)


def pick_pairs(num_samples: int, num_views: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct random (sample, view) pairs (all of them when there are fewer), sorted."""
    total = num_samples * num_views
    flat = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    return (flat // num_views).astype(np.int64), (flat % num_views).astype(np.int64)


def live_check(
    path: str | os.PathLike,
    n: int,
    teacher: str | None = None,
    data: str | None = None,
    seed: int = 0,
    provider: str = "cpu",
    threads: int | None = None,
    batch_size: int = 64,
) -> LiveReport:
    """Re-run the teacher on ``n`` random (sample, view) pairs of the cache at ``path`` and compare."""
    from kdpipe import cache as cache_mod
    from kdpipe.data import load_dataset

    if n < 1:
        raise KdpipeError(f"--live {n}: give the number of (sample, view) pairs to re-run, e.g. --live 64")
    c = cache_mod.open(path)
    m = c.manifest
    tpath, graph, taps = _teacher_of(c, path, teacher)
    dataset = load_dataset(data or m["dataset"]["spec"], exclude=m["dataset"].get("skipped", []))
    if dataset.fingerprint() != m["dataset"]["fingerprint"]:
        raise KdpipeError(
            f"cache verify --live: dataset {data or m['dataset']['spec']!r} is not the one this cache was "
            "made from (fingerprint differs); pass --data with the original"
        )
    samples, views = pick_pairs(len(c), c.num_views, n, seed)
    params = np.asarray(c.array("view_params")[samples, views]).reshape(-1, 5)
    problems = _check_views_and_labels(c, dataset, samples, views, params)
    live = _run_teacher(c, graph, taps, dataset, samples, params, provider, threads, batch_size)
    if "grad" in m["arrays"]:
        live["grad"] = _live_grad(c, graph, taps, dataset, samples, params, batch_size)
    stored = {name: _stored(c, name, samples, views) for name in live}
    reports: dict[str, KindReport] = {}
    for name, got in live.items():
        dtype = "float16" if name == "logits" and "logits" not in m["arrays"] else m["arrays"][name]["dtype"]
        r = reports.setdefault(name.split(".")[0], KindReport(name.split(".")[0], dtype))
        r.arrays.append(name)
        diff, worst = _compare(stored[name], got, RTOL[dtype], ABS.get(dtype, 0.0))
        r.max_abs_diff, r.worst = max(r.max_abs_diff, diff), max(r.worst, worst)
    ordered = [reports[k] for k in ("logits", "at", "dct", "pooled", "attn", "grad") if k in reports]
    return LiveReport(len(samples), str(tpath), graph.sha256 == m["teacher"]["sha256"], ordered, problems)


def _teacher_of(c: Any, path: str | os.PathLike, teacher: str | None) -> tuple[str, Any, list[Any]]:
    """(path, graph, taps) of the teacher file, checked against the taps the cache records."""
    from kdpipe.teacher import load_teacher, resolve_taps

    m = c.manifest
    tpath = teacher or (m.get("run") or {}).get("teacher_file")
    if not tpath or not Path(tpath).is_file():
        raise KdpipeError(
            f"cache verify --live: the teacher file {tpath!r} recorded in {path}/manifest.json is not here; "
            "pass --teacher PATH (the same ONNX file)"
        )
    graph = load_teacher(str(tpath))
    names = [t["name"] for t in m.get("taps", [])]
    taps = resolve_taps(graph, names) if names else []
    for t, want in zip(taps, m.get("taps", []), strict=True):
        if list(t.shape) != list(want["shape"]):
            raise KdpipeError(
                f"cache verify --live: tap {t.name} of {tpath} has shape {list(t.shape)}, the cache says "
                f"{want['shape']}: this is not the teacher of this cache"
            )
    return str(tpath), graph, taps


def _check_views_and_labels(
    c: Any, dataset: Any, samples: np.ndarray, views: np.ndarray, params: np.ndarray
) -> list[str]:
    """Stored view parameters against the view policy's own draw, stored labels against the dataset."""
    from kdpipe.data.views import ViewPolicy, draw_view_params

    m = c.manifest
    policy = ViewPolicy.from_dict(m["views"]["policy"])
    draw_views = views if policy.kind != "none" else np.full_like(views, -1)
    drawn = draw_view_params(policy, int(m["views"]["seed"]), samples, draw_views, dataset.sizes()[samples])
    problems = []
    bad = np.flatnonzero((drawn != params).any(axis=1))
    if len(bad):
        s0, v0 = int(samples[bad[0]]), int(views[bad[0]])
        problems.append(
            f"view_params: {len(bad)} of {len(samples)} pair(s) differ from the view policy's draw "
            f"(first: sample {s0} view {v0})"
        )
    wrong = np.flatnonzero(np.asarray(c.labels)[samples] != dataset.labels[samples])
    if len(wrong):
        problems.append(
            f"labels: {len(wrong)} of {len(samples)} differ from the dataset "
            f"(first: sample {samples[wrong[0]]})"
        )
    return problems


def _run_teacher(
    c: Any, graph: Any, taps: list[Any], dataset: Any, samples: np.ndarray, params: np.ndarray,
    provider: str, threads: int | None, batch_size: int,
) -> dict[str, np.ndarray]:  # fmt: skip
    """The teacher's targets of the rebuilt views, by stored array name (float32). A top-K cache gets
    the dense logits rebuilt from the live top K (what distill rebuilds from the stored ones)."""
    from kdpipe.cache_teacher import top_k_logits
    from kdpipe.data.views import ViewPolicy, apply_views
    from kdpipe.targets import dense_logits
    from kdpipe.teacher import TeacherRunner, TeacherSpec

    m = c.manifest
    spec = TeacherSpec.from_dict(m["teacher"]["spec"])
    runner = TeacherRunner(
        graph, taps, spec, targets=set(m["targets"]["kinds"]) - {"grad"} | {"logits"}, provider=provider,
        threads=threads,
        reduce="graph", dct_variants=m["targets"].get("dct", {}).get("variants", ()), spinning=False,
        token_clip=m["targets"].get("at", {}).get("token_clip"),
    )  # fmt: skip
    images = dataset.load(samples)
    per_item = images if isinstance(images, np.ndarray) else list(images)
    inputs = spec.preprocess(apply_views(per_item, params, ViewPolicy.from_dict(m["views"]["policy"])))
    parts: dict[str, list[np.ndarray]] = {}
    for b in range(0, len(inputs), batch_size):
        for k, v in runner.run(inputs[b : b + batch_size]).items():
            parts.setdefault(k, []).append(v)
    live = {k: np.concatenate(v) for k, v in parts.items() if k in m["arrays"]}
    if "logits.topk" in m["arrays"]:
        top = top_k_logits(np.concatenate(parts["logits"]), m["arrays"]["logits.topk"]["shape"][0])
        values, index, rest = (torch_of(top[k]) for k in ("logits.topk", "logits.topk_index", "logits.rest"))
        live["logits"] = dense_logits(values, index, rest, int(m["teacher"]["num_classes"])).numpy()
    return live


def _live_grad(
    c: Any,
    graph: Any,
    taps: list[Any],
    dataset: Any,
    samples: np.ndarray,
    params: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """J_T of the rebuilt views through the teacher's replica (kdpipe.teacher.gradients), float32."""
    from kdpipe.data.views import ViewPolicy, apply_views
    from kdpipe.gradient import parse_form
    from kdpipe.teacher import TeacherSpec
    from kdpipe.teacher.gradients import TeacherGradients

    m = c.manifest
    spec = TeacherSpec.from_dict(m["teacher"]["spec"])
    grads = TeacherGradients(graph, taps, spec, parse_form(m["targets"]["grad"]["form"]), batch_size)
    images = dataset.load(samples)
    per_item = images if isinstance(images, np.ndarray) else list(images)
    inputs = spec.preprocess(apply_views(per_item, params, ViewPolicy.from_dict(m["views"]["policy"])))
    return grads(inputs, dataset.labels[samples].astype(np.int64))


def _stored(c: Any, name: str, samples: np.ndarray, views: np.ndarray) -> np.ndarray:
    """Stored values of target ``name`` of the pairs; for a top-K cache, "logits" are rebuilt dense."""
    from kdpipe.targets import dense_logits

    if name != "logits" or "logits" in c.arrays:
        return c.gather(name, samples, views)
    values, index, rest = (
        torch_of(c.gather(k, samples, views)) for k in ("logits.topk", "logits.topk_index", "logits.rest")
    )
    return dense_logits(values, index, rest, int(c.manifest["teacher"]["num_classes"])).numpy()


def torch_of(a: np.ndarray) -> Any:
    """A torch view of a NumPy array (torch is imported only when needed)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


def _compare(stored: np.ndarray, got: np.ndarray, rtol: float, atol: float = 0.0) -> tuple[float, float]:
    """(largest |stored - live|, largest |diff| / allowed) with the module's per-element tolerance
    (``atol``: the storage dtype's absolute rounding, added)."""
    got = got.astype(np.float64).reshape(len(got), -1)
    stored = stored.astype(np.float64).reshape(len(got), -1)
    scale = np.maximum(np.abs(got), FLOOR * np.abs(got).max(axis=1, keepdims=True))
    diff = np.abs(stored - got)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / (rtol * scale + atol))
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    return float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0)), float(ratio.max(initial=0.0))


def format_report(rep: LiveReport) -> list[str]:
    """One line per target kind, then the problems."""
    lines = [
        f"live: re-ran the teacher {rep.teacher} on {rep.pairs} random (sample, view) pair(s)"
        + ("" if rep.teacher_matches else " (WARNING: its sha256 differs from the one in the manifest)")
    ]
    for k in rep.kinds:
        verdict = f"OK ({k.worst:.2g} of the tolerance)" if k.ok else f"BEYOND TOLERANCE ({k.worst:.3g}x)"
        lines.append(
            f"  {k.kind:<7} max |stored - live| = {k.max_abs_diff:.3g}  "
            f"({k.dtype}, rtol {RTOL[k.dtype]:g}; {len(k.arrays)} array(s))  {verdict}"
        )
    lines += [f"  MISMATCH: {p}" for p in rep.problems]
    return lines
