"""`kdpipe cache-teacher`: run an ONNX teacher once over a dataset and its views, write the target cache.

Data flow per chunk of samples: indices -> (sample, view) pairs -> view parameters drawn from
(seed, sample, view) -> uint8 views -> teacher preprocessing -> onnxruntime (targets reduced in the
graph or by the native ops) -> storage dtype -> one journaled chunk write. The next chunk's inputs are
prepared in a background thread while the teacher runs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdpipe import __version__, ops
from kdpipe.cache import format as fmt
from kdpipe.errors import KdpipeError
from kdpipe.gradient import parse_form
from kdpipe.progress import Progress

ALL_TARGETS = ("logits", "at", "dct", "pooled", "grad")  # the kinds every teacher has
TOKEN_TARGETS = ("attn",)  # transformer teachers only: the class token's attention (vit_surgery)
# DCT targets are derived from the at maps at training time unless asked for (kdpipe/targets.py)
DEFAULT_TARGETS = ("logits", "at", "pooled")
GRAD_DEFINITION = "d(sum_b CE(teacher(x_b), y_b))/du, u = RGB NCHW image in [0,1] (pixel/255) before mean/std"


@dataclass
class CacheJob:
    """Everything `cache-teacher` needs. ``views=0`` caches the plain, un-augmented input (1 view)."""

    teacher: str
    data: str
    out: str
    taps: str | list[str] = "auto"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dct_variants: tuple[str, ...] = ("dft-abs",)
    views: int = 0
    augment: str = "auto"  # "auto" | "pad-crop" | "rrc"
    pad: int = 4
    flip: bool = True
    seed: int = 0
    batch_size: int = 256
    chunk_size: int = 0  # samples per chunk; 0 = about 4096 (sample, view) items per chunk
    provider: str = "auto"
    threads: int | None = None
    reduce: str = "graph"
    map_dtype: str = "float16"
    vec_dtype: str | None = None  # None: pooled float16, full logits float32; a dtype: both
    logits: str = "auto"  # "auto" | "full" | "topk:K" (auto: full up to 100 classes, else topk:TOPK_AUTO)
    shard: str | None = None
    card: str | None = None
    spec_overrides: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    # onnxruntime's threads spin between operators (its default): the job runs one session and trains
    # nothing, and its preparation and write threads need little CPU (docs/benchmarks.md)
    spinning: bool = True
    skip_bad: bool = False  # image folders: leave out files that do not decode (recorded in the manifest)
    estimate: bool = False  # only say how large the cache will be; run nothing, write nothing
    # accept NaN/inf teacher outputs: the cache is completed and COMPLETE.json records them; without it
    # every chunk is still written and journaled, only completion is refused (a rerun with it resumes)
    allow_nonfinite: bool = False
    grad_form: str = "full"  # --targets grad: full | csum | pool:K | csum+pool:K (kdpipe/gradient.py)
    grad_dtype: str = "float16"  # storage dtype of the grad array
    token_clip: float | None = None  # transformer taps: clip at maps at this per-sample quantile (outliers)


def view_policy_for(job: CacheJob, size: tuple[int, int], image_side: int) -> Any:
    """The ViewPolicy of a job: plain for ``views=0``, else pad-crop (small images) or rrc (large)."""
    from kdpipe.data.views import ViewPolicy

    if size[0] != size[1]:
        raise KdpipeError(f"teacher input {size[0]}x{size[1]} is not square; kdpipe views are square crops")
    if job.views == 0:
        return ViewPolicy(kind="none", size=size[0], flip=False)
    kind = job.augment
    if kind == "auto":
        kind = "pad-crop" if image_side <= 64 else "rrc"
    if kind not in ("pad-crop", "rrc"):
        raise KdpipeError(f"--augment {job.augment!r}: choose auto, pad-crop or rrc")
    return ViewPolicy(kind=kind, size=size[0], pad=job.pad, flip=job.flip)


TOPK_AUTO = 100  # top-K kept by --logits auto past 100 classes (docs/methods.md, "Compact logits")


def logits_mode(spec: str, num_classes: int) -> int:
    """K of ``--logits`` (0 = full logits) for a teacher with ``num_classes`` outputs."""
    if spec == "full" or (spec == "auto" and num_classes <= 100):
        return 0
    if spec == "auto":
        return min(TOPK_AUTO, num_classes)
    kind, _, k = spec.partition(":")
    if kind != "topk" or not k.isdigit() or not 1 <= int(k) <= num_classes:
        raise KdpipeError(
            f"--logits {spec!r}: use auto, full or topk:K with 1 <= K <= {num_classes} "
            "(the teacher's classes)"
        )
    return 0 if int(k) == num_classes else int(k)


ATTN_DEFINITION = "mean over heads of the class token's softmax attention to the patch tokens, on (h, w)"


def token_record(tap: Any) -> dict[str, Any]:
    """The manifest keys of a transformer tap (token count, first patch token, block); {} for a CNN tap,
    so CNN manifests are unchanged."""
    if tap.layout != "NLC":
        return {}
    return {"tokens": tap.tokens, "token_start": tap.token_start, "block": tap.block}


def decoder_versions() -> dict[str, str | None]:
    from kdpipe.data.folder import decoder_versions as versions

    return versions()


def build_manifest(job: CacheJob, graph: Any, taps: list[Any], spec: Any, dataset: Any, policy: Any) -> dict:
    """The self-describing manifest: what was cached, from what, how, and the array layout."""
    num_views = max(job.views, 1)
    arrays: dict[str, dict[str, Any]] = {
        "labels": {"shape": [], "dtype": "int64", "per": "sample"},
        "view_params": {"shape": [5], "dtype": "int32", "per": "view"},
    }
    topk = logits_mode(job.logits, graph.num_classes) if "logits" in job.targets else 0
    if "logits" in job.targets and not topk:
        arrays["logits"] = {"shape": [graph.num_classes], "dtype": job.vec_dtype or "float32", "per": "view"}
    elif topk:
        index = "int16" if graph.num_classes <= 32767 else "int32"
        arrays["logits.topk"] = {"shape": [topk], "dtype": "float16", "per": "view"}
        arrays["logits.topk_index"] = {"shape": [topk], "dtype": index, "per": "view"}
        arrays["logits.rest"] = {"shape": [1], "dtype": "float16", "per": "view"}
    for i, tap in enumerate(taps):
        c, h, w = tap.shape
        if "at" in job.targets:
            arrays[f"at.{i}"] = {"shape": [h, w], "dtype": job.map_dtype, "per": "view"}
        if "dct" in job.targets:
            for v in job.dct_variants:
                arrays[f"dct.{v}.{i}"] = {"shape": [h, w], "dtype": job.map_dtype, "per": "view"}
        if "pooled" in job.targets:
            arrays[f"pooled.{i}"] = {"shape": [c], "dtype": job.vec_dtype or "float16", "per": "view"}
        if "attn" in job.targets:
            arrays[f"attn.{i}"] = {"shape": [h, w], "dtype": job.map_dtype, "per": "view"}
    form = parse_form(job.grad_form, (spec.size[0], spec.size[1]))
    if "grad" in job.targets:
        shape = form.shape((spec.normalize.channels, *spec.size))
        arrays["grad"] = {"shape": list(shape), "dtype": job.grad_dtype, "per": "view"}
    chunk = job.chunk_size or max(1, 4096 // num_views)
    return {
        "kind": "kdpipe-teacher-cache",
        "num_samples": len(dataset),
        "num_views": num_views,
        "chunk_size": chunk,
        "arrays": arrays,
        "taps": [
            {
                "name": t.name,
                "shape": list(t.shape),
                "layout": t.layout,
                "op_type": t.op_type,
                "module_path": t.module_path,
                **token_record(t),
            }
            for t in taps
        ],
        "targets": {
            "kinds": [k for k in ALL_TARGETS + TOKEN_TARGETS if k in job.targets],
            "at": {
                "definition": "l2normalize(mean_c(F**2)) per sample",
                "eps": ops.AT_EPS,
                **({"token_clip": job.token_clip} if job.token_clip is not None else {}),
            },
            "dct": {"variants": list(job.dct_variants), "eps": ops.DCT_EPS},
            "pooled": {"definition": "mean_hw(F)"},
            **({"attn": {"definition": ATTN_DEFINITION}} if "attn" in job.targets else {}),
            "logits": {"top_k": topk, "rest": "mean of the other logits" if topk else None},
            # only with grad, so that caches without it keep the manifest (and resume) of before
            **({"grad": {"definition": GRAD_DEFINITION, "form": form.text}} if "grad" in job.targets else {}),
        },
        "teacher": {
            "sha256": graph.sha256,
            "input": graph.input.to_dict(),
            "num_classes": graph.num_classes,
            "spec": spec.to_dict(),
        },
        "dataset": {
            "spec": job.data,
            "fingerprint": dataset.fingerprint(),
            "class_names": dataset.class_names,
            "skipped": list(getattr(dataset, "skipped", [])),
            **({"decoder": dataset.decoder()} if hasattr(dataset, "decoder") else {}),
        },
        "views": {"policy": policy.to_dict(), "seed": job.seed, "count": job.views},
        # "run" is the one section a resume does not compare: where things were, which software.
        "run": {
            "teacher_file": str(graph.path),
            "kdpipe": __version__,
            "command": "kdpipe cache-teacher (same arguments) to resume",
            **({"decoder_versions": decoder_versions()} if hasattr(dataset, "decoder") else {}),
        },
    }


@dataclass
class _Prepared:
    chunk: int
    start: int
    stop: int
    params: np.ndarray  # (n*V, 5) int32
    labels: np.ndarray  # (n,) int64
    inputs: np.ndarray  # (n*V, ...) float32 teacher input


class _InputBlocks:
    """Two reusable float32 blocks for the teacher input, alternated between chunks.

    Chunk k is prepared into block k % 2 while the teacher reads chunk k - 1 from the other; chunk
    k + 2 reuses the block only after the teacher is done with chunk k (the main loop submits it
    then). A fresh 12 MiB block per chunk would be page-faulted in every time, which costs ~20 ms of
    CPU per chunk on the project's VM while the teacher runs.
    """

    def __init__(self) -> None:
        self._blocks: list[np.ndarray | None] = [None, None]

    def take(self, k: int, shape: tuple[int, ...]) -> np.ndarray:
        """A C-contiguous float32 array of ``shape`` backed by block ``k % 2``."""
        size = int(np.prod(shape))
        block = self._blocks[k % 2]
        if block is None or block.size < size:
            block = self._blocks[k % 2] = np.empty(size, np.float32)
        return block[:size].reshape(shape)


def _prepare(
    chunk: int,
    start: int,
    stop: int,
    num_views: int,
    dataset: Any,
    policy: Any,
    spec: Any,
    seed: int,
    out: Callable[[tuple[int, ...]], np.ndarray] | None = None,
) -> _Prepared:
    """Make chunk ``chunk``'s teacher inputs; ``out(shape)``, if given, supplies the float32 block."""
    from kdpipe.data.views import apply_views, draw_view_params

    samples = np.arange(start, stop, dtype=np.int64)
    n = len(samples)
    rep = np.repeat(samples, num_views)
    views = np.tile(np.arange(num_views, dtype=np.int64), n)
    if policy.kind == "none":
        views = np.full_like(views, -1)
    sizes = dataset.sizes()[rep]
    params = draw_view_params(policy, seed, rep, views, sizes)
    images = dataset.load(samples)
    which = np.repeat(np.arange(n), num_views)
    per_item: np.ndarray | list[np.ndarray] = (
        images[which] if isinstance(images, np.ndarray) else [images[i] for i in which]
    )
    uint8_views = apply_views(per_item, params, policy)
    b, h, w, _ = uint8_views.shape
    c = spec.normalize.channels
    block = out((b, c, h, w) if spec.layout == "NCHW" else (b, h, w, c)) if out is not None else None
    inputs = spec.preprocess(uint8_views, out=block)
    return _Prepared(chunk, start, stop, params, dataset.labels[start:stop].astype(np.int64), inputs)


def _run_batches(runner: Any, x: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for b in range(0, len(x), batch_size):
        for k, v in runner.run(x[b : b + batch_size]).items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _chunks_in_order(writer: Any, pending: list[int]) -> Iterator[tuple[int, int, int]]:
    for c in pending:
        start, stop = writer.chunk_range(c)
        yield c, start, stop


def _check_job(job: CacheJob) -> None:
    """One-line refusals of the job's own settings, before anything is loaded."""
    unknown = set(job.targets) - set(ALL_TARGETS + TOKEN_TARGETS)
    if unknown or not job.targets:
        raise KdpipeError(
            f"--targets {','.join(job.targets)}: choose from {','.join(ALL_TARGETS + TOKEN_TARGETS)}"
        )
    for v in job.dct_variants:
        if v not in ops.DCT_VARIANTS:
            raise KdpipeError(f"--dct-variant {v!r}: choose from {', '.join(ops.DCT_VARIANTS)}")
    if job.views < 0:
        raise KdpipeError(f"--views {job.views}: must be >= 0 (0 = the plain input)")


def _say_skipped(dataset: Any, log: Any) -> None:
    skipped = list(getattr(dataset, "skipped", []))
    if skipped:
        log(
            f"--skip-bad: left out {len(skipped)} unreadable image(s) ({', '.join(skipped[:3])}"
            f"{', ...' if len(skipped) > 3 else ''}); recorded in the manifest"
        )


def cache_teacher(job: CacheJob, log: Any = print) -> dict[str, Any]:
    """Run the job (resuming if the cache exists) and return a summary dict."""
    from kdpipe import cache as cache_mod
    from kdpipe.data import load_dataset
    from kdpipe.distributed import discover_shard
    from kdpipe.memory import keep_freed_memory
    from kdpipe.teacher import TeacherRunner, load_teacher, resolve_taps, spec_for
    from kdpipe.teacher.outliers import check_clip
    from kdpipe.teacher.vit_surgery import check_attention

    keep_freed_memory(one_arena=True)  # before the preparation and write threads start
    _check_job(job)
    graph = load_teacher(job.teacher)
    taps = resolve_taps(graph, job.taps) if {"at", "dct", "pooled", "attn"} & set(job.targets) else []
    if "attn" in job.targets:
        check_attention(taps)  # before anything is written
    check_clip(job.token_clip)
    dataset = load_dataset(job.data, skip_bad=job.skip_bad)
    _say_skipped(dataset, log)
    spec = spec_for(graph, card=job.card, **job.spec_overrides)
    if graph.num_classes and dataset.num_classes > graph.num_classes:
        raise KdpipeError(
            f"dataset {job.data!r} has {dataset.num_classes} classes but the teacher outputs "
            f"{graph.num_classes} logits: wrong teacher or wrong dataset"
        )
    sizes = dataset.sizes()
    policy = view_policy_for(job, spec.size, int(sizes.max()) if len(sizes) else 0)
    manifest = build_manifest(job, graph, taps, spec, dataset, policy)
    if job.estimate:
        return estimate(manifest)
    grads = _teacher_gradients(job, graph, taps, spec, log)  # before anything is written
    shard = discover_shard(job.shard)
    writer = cache_mod.create_or_resume(job.out, manifest, shard=(shard.index, shard.count))
    pending = writer.pending_chunks()
    order = list(_chunks_in_order(writer, pending))
    total_items = sum(b - a for _, a, b in order) * manifest["num_views"]

    if not pending:
        try:  # also seals a shard whose chunks were all journaled before a crash
            _finish(job, writer, log)
        finally:
            writer.close()
        log(f"cache {job.out} is already complete for shard {shard}; nothing to do")
        return _summary(job, manifest, shard, 0, 0.0, None, [])
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdpipe-prep") as prep_pool:
            blocks = _InputBlocks()

            def prepare(k: int) -> Any:
                c, a, b = order[k]
                views = manifest["num_views"]
                out = functools.partial(blocks.take, k)
                return prep_pool.submit(_prepare, c, a, b, views, dataset, policy, spec, job.seed, out)

            first = prepare(0)  # the first chunk's inputs are made while the session is created
            runner = TeacherRunner(
                graph,
                taps,
                spec,
                targets=(set(job.targets) - {"grad"}) | {"logits"},  # logits: the top-1 printed
                provider=job.provider,
                threads=job.threads,
                reduce=job.reduce,
                dct_variants=job.dct_variants,
                spinning=job.spinning,
                token_clip=job.token_clip,
            )
            log(
                f"teacher {graph.path} on {', '.join(runner.providers)}; {len(taps)} tap(s): "
                + ", ".join(f"{t.name} {tuple(t.shape)}" for t in taps)
            )
            if shard.count > 1:
                log(f"shard {shard} ({shard.source}): {len(pending)} chunk(s) to do")
            elif len(pending) < len(writer.chunks):
                log(f"resuming: {len(pending)} of {len(writer.chunks)} chunk(s) left")
            t0 = time.perf_counter()
            correct, seen = _run_chunks(
                job, writer, runner, manifest, order, prepare, first, total_items, grads
            )
        _finish(job, writer, log)
    finally:
        writer.close()
    elapsed = time.perf_counter() - t0
    accuracy = (correct / seen) if seen else None
    if accuracy is not None and dataset.num_classes > 1 and accuracy <= 1.0 / dataset.num_classes:
        log(
            f"WARNING: the teacher's top-1 on these views is {100 * accuracy:.2f}%, at or below chance "
            f"({100 / dataset.num_classes:.2f}% for {dataset.num_classes} classes): wrong teacher, wrong "
            "class order, or wrong preprocessing (check --card / --mean / --std / --bgr)"
        )
    return _summary(job, manifest, shard, total_items, elapsed, accuracy, runner.providers)


def _teacher_gradients(job: CacheJob, graph: Any, taps: list[Any], spec: Any, log: Any) -> Any:
    """The J_T source of ``--targets grad`` (None without it): the replica, built once per job."""
    if "grad" not in job.targets:
        return None
    import torch

    from kdpipe.teacher.gradients import TeacherGradients

    torch.set_num_threads(job.threads or ops.allowed_cpus())
    grads = TeacherGradients(graph, taps, spec, parse_form(job.grad_form), batch_size=job.batch_size)
    log(f"grad: PyTorch replica of the teacher built (onnx2torch); J_T form {grads.form.text}, "
        f"{grads.shape} per view; compared with onnxruntime on the first batch it runs")  # fmt: skip
    return grads


def top_k_logits(logits: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """(N,C) float32 logits -> their K largest values (largest first), classes, and the other
    classes' mean: the arrays of ``--logits topk:K``."""
    idx = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(logits, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx, vals = np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1)
    c = logits.shape[1]
    rest = (logits.sum(1, dtype=np.float64) - vals.sum(1, dtype=np.float64)) / max(c - k, 1)
    return {"logits.topk": vals, "logits.topk_index": idx, "logits.rest": rest.astype(np.float32)[:, None]}


def estimate(manifest: dict) -> dict[str, Any]:
    """Bytes per view of each stored array and of the whole cache ``manifest`` describes."""
    from kdpipe.cache import format as fmt

    arrays = fmt.parse_arrays(manifest["arrays"])
    n, v = manifest["num_samples"], manifest["num_views"]
    return {
        "estimate": True,
        "arrays": fmt.view_bytes(arrays, v),
        "bytes_per_view": fmt.bytes_per_view(arrays, v),
        "samples": n,
        "views": v,
        "bytes": fmt.projected_bytes(arrays, n, v),
    }


def _check_shapes(out: dict[str, np.ndarray], manifest: dict, items: int) -> None:
    """KdpipeError when a teacher output does not have the shape its graph declared (and the manifest
    stores): onnxruntime runs some graphs whose declared output shapes are wrong."""
    declared = {k: v["shape"] for k, v in manifest["arrays"].items() if k not in ("labels", "view_params")}
    if "logits.topk" in declared:  # the top-K arrays are made from the full logits when stored
        for k in ("logits.topk", "logits.topk_index", "logits.rest"):
            del declared[k]
        declared["logits"] = [manifest["teacher"]["num_classes"]]
    for name, shape in declared.items():
        got = out[name].shape if name in out else None
        if got != (items, *shape):
            raise KdpipeError(
                f"the teacher's output for {name} has shape {got} for {items} input(s), but its graph "
                f"declares {tuple(shape)} per input; re-export the model"
            )


def _finish(job: CacheJob, writer: Any, log: Any) -> None:
    """Mark the shard complete, unless its chunks hold NaN/inf and ``job.allow_nonfinite`` is off."""
    bad = writer.nonfinite()
    if bad and not job.allow_nonfinite:
        raise KdpipeError(
            f"the teacher's outputs hold {fmt.nonfinite_text(bad)}; cache {job.out} is NOT "
            "marked complete (all chunks are kept): check the teacher and its preprocessing, or rerun "
            "the same command with --allow-nonfinite to accept them (nothing is recomputed)"
        )
    if bad:
        log(f"warning: {fmt.nonfinite_text(bad)}; accepted (--allow-nonfinite), see COMPLETE.json")
    writer.finish(allow_nonfinite=job.allow_nonfinite)


def _nonfinite_samples(x: np.ndarray, start: int) -> list[int]:
    """Global indices of the samples (axis 0 of ``x``, first sample ``start``) with a NaN/inf value."""
    bad = ~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
    return (np.flatnonzero(bad) + start).tolist()


def _overflow_error(name: str, x: np.ndarray, dtype: str, start: int) -> KdpipeError:
    """The one-line error of a target that does not fit its storage dtype: array, samples, the fix."""
    over = ops.storage_overflow(x, dtype)
    samples = (np.flatnonzero(over.any(axis=1)) + start).tolist()
    first = ", ".join(str(s) for s in samples[:10]) + (", ..." if len(samples) > 10 else "")
    flag = {"at": "--dtype", "dct": "--dtype", "grad": "--grad-dtype"}.get(name.split(".")[0], "--vec-dtype")
    return KdpipeError(
        f"target {name} overflows {dtype} in {len(samples)} sample(s) ({first}; max |x| = "
        f"{float(np.abs(x[over]).max()):.4g}); rerun with {flag} float32 into a new --out folder"
    )


def _store_and_write(writer: Any, manifest: dict, prep: _Prepared, out: dict[str, np.ndarray]) -> None:
    """Convert one chunk's float32 targets to their storage dtypes and write it (journaled, with the
    samples whose targets hold NaN/inf)."""
    num_views = manifest["num_views"]
    n = prep.stop - prep.start
    arrays: dict[str, np.ndarray] = {
        "labels": prep.labels,
        "view_params": prep.params.reshape(n, num_views, 5).astype(np.int32),
    }
    if "logits.topk" in manifest["arrays"]:
        out = {**out, **top_k_logits(out["logits"], manifest["arrays"]["logits.topk"]["shape"][0])}
    for name, meta in manifest["arrays"].items():
        if name in arrays:
            continue
        if meta["dtype"].startswith("int"):
            arrays[name] = out[name].astype(meta["dtype"]).reshape(n, num_views, *meta["shape"])
            continue
    nonfinite: dict[str, list[int]] = {}
    for name, meta in manifest["arrays"].items():
        if name in arrays:
            continue
        x = out[name].reshape(n, -1)  # rows of a sample's views are consecutive
        nonfinite[name] = _nonfinite_samples(x, prep.start)
        try:
            # one thread: this runs beside the teacher, whose threads already use the cores
            stored = ops.to_storage(out[name], meta["dtype"], threads=1)
        except OverflowError:
            raise _overflow_error(name, x, meta["dtype"], prep.start) from None
        arrays[name] = stored.reshape(n, num_views, *meta["shape"])
    writer.write_chunk(prep.chunk, arrays, nonfinite)


def _run_chunks(
    job: CacheJob,
    writer: Any,
    runner: Any,
    manifest: dict,
    order: list[tuple[int, int, int]],
    prepare: Callable[[int], Future],
    first: Future,
    total_items: int,
    grads: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[int, int]:
    """Run the chunks ``order`` (``prepare(k)`` submits the k-th one's inputs, ``first`` is chunk 0's);
    returns (correct, seen).

    Three stages overlap: the next chunk's inputs are prepared in one background thread and the
    previous chunk is converted and written (with fsync) in another, while the teacher runs.
    """
    num_views = manifest["num_views"]
    correct = seen = 0
    bar = Progress(total_items, "cache", enabled=job.progress)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdpipe-write") as write_pool:
        fut: Future | None = first
        writing: Future | None = None
        for k in range(len(order)):
            assert fut is not None
            prep = fut.result()
            fut = prepare(k + 1) if k + 1 < len(order) else None
            out = _run_batches(runner, prep.inputs, job.batch_size)
            n = prep.stop - prep.start
            if grads is not None:  # J_T through the replica, with each view's true label
                out["grad"] = grads(prep.inputs, np.repeat(prep.labels, num_views))
            _check_shapes(out, manifest, n * num_views)
            if "logits" in out:
                pred = out["logits"].argmax(1).reshape(n, num_views)
                correct += int((pred == prep.labels[:, None]).sum())
                seen += n * num_views
            if writing is not None:
                writing.result()  # at most one chunk in flight; re-raises its error here
            writing = write_pool.submit(_store_and_write, writer, manifest, prep, out)
            bar.update(n * num_views, acc=f"{100 * correct / seen:.1f}%" if seen else "-")
        if writing is not None:
            writing.result()
    bar.close()
    return correct, seen


def _summary(
    job: CacheJob,
    manifest: dict,
    shard: Any,
    items: int,
    elapsed: float,
    accuracy: float | None,
    providers: list[str],
) -> dict[str, Any]:
    from kdpipe import cache as cache_mod

    info = cache_mod.info(job.out)
    return {
        "cache": job.out,
        "samples": manifest["num_samples"],
        "views": manifest["num_views"],
        "shard": str(shard),
        "items_done": items,
        "seconds": round(elapsed, 3),
        "items_per_s": round(items / elapsed, 1) if elapsed > 0 else None,
        "bytes_on_disk": info.get("bytes_on_disk"),
        "complete": info.get("complete"),
        "teacher_accuracy": accuracy,
        "providers": providers,
    }
