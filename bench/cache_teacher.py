"""Benchmark of `kdpipe cache-teacher` against plain onnxruntime inference (logits only).

Teachers of ResNet-56 and WRN-40-2 size (kdpipe's zoo, random weights, 3x32x32 input, 100 classes)
are exported to ONNX in a temporary folder; the data are random uint8 32x32x3 images. Measured, in
images per second, with the same batch and onnxruntime threads:

- ``plain``: an onnxruntime session computing the logits of already preprocessed float32 inputs;
- ``runner-graph`` / ``runner-native``: kdpipe's TeacherRunner with all targets (logits, attention
  maps, DCT maps, pooled vectors) on the same float32 inputs, no I/O, one reduce mode each;
- ``cache-graph`` / ``cache-native``: ``kdpipe.cache_teacher.cache_teacher`` end to end on a .npz
  file: load the teacher, read the images, make the views, preprocess, run, convert to the storage
  dtypes, write the journaled cache to disk (nothing subtracted; a fresh cache folder each repeat).

Each of ``--repeats`` rounds runs plain, then every other path (in an order rotated by one each
round) followed by plain again (plain on half the images). Two overheads relative to ``plain``:
*best/best* (best rate of each path vs the best plain rate) and *paired*, the median (and quartiles)
over rounds of a path's rate against the mean rate of the two plain runs around it (the headline:
this machine's speed drifts by 10-20 % over minutes, which the neighbours cancel to first order).
``cache-* steady`` counts from the start of the second chunk's teacher run to the end of the job. With
``--profile`` the end-to-end run is also broken down by stage (time inside each stage, summed over
chunks; the view preparation runs in a background thread, so stages overlap).

Usage: ``python bench/cache_teacher.py [--quick] [--images N] [--repeats R] [--profile]``.
Writes bench/results/cache_teacher.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "cache_teacher.json"
TEACHERS = {"resnet56": "ResNet-56", "wrn_40_2": "WRN-40-2"}
CLASSES = 100
SIZE = 32


def export_teacher(name: str, folder: Path) -> str:
    """Export zoo model ``name`` (random weights, eval mode) to ONNX with a dynamic batch."""
    import torch

    from kdpipe.student import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=CLASSES).eval()
    path = folder / f"{name}.onnx"
    x = torch.zeros(2, 3, SIZE, SIZE)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
    return str(path)


def make_data(n: int, folder: Path) -> tuple[str, np.ndarray]:
    """Random images as a .npz file (for cache-teacher) and as preprocessed float32 NCHW (for plain)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    y = rng.integers(0, CLASSES, n)
    y[:CLASSES] = np.arange(CLASSES)
    path = folder / "data.npz"
    np.savez(path, x=x, y=y)
    xf = np.ascontiguousarray((x.astype(np.float32) * np.float32(1 / 255)).transpose(0, 3, 1, 2))
    return str(path), xf


def timed(fn: Callable[[], Any], repeats: int, warmup: bool = True) -> list[float]:
    if warmup:
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def rate(n: int, times: list[float]) -> dict[str, Any]:
    return {
        "best_img_s": round(n / min(times), 1),
        "median_img_s": round(n / statistics.median(times), 1),
        "times_s": [round(t, 4) for t in times],
    }


def plain_fn(path: str, xf: np.ndarray, batch: int, threads: int) -> Callable[[], None]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run() -> None:
        for b in range(0, len(xf), batch):
            sess.run(None, {name: xf[b : b + batch]})

    return run


def runner_fn(path: str, xf: np.ndarray, batch: int, threads: int, reduce: str) -> Callable[[], None]:
    from kdpipe.cache_teacher import ALL_TARGETS
    from kdpipe.teacher import TeacherRunner, auto_taps, load_teacher

    graph = load_teacher(path)
    runner = TeacherRunner(
        graph, auto_taps(graph), None, set(ALL_TARGETS), provider="cpu", threads=threads, reduce=reduce
    )

    def run() -> None:
        for b in range(0, len(xf), batch):
            runner.run(xf[b : b + batch])

    return run


def cache_job(
    path: str, npz: str, out: Path, batch: int, threads: int, reduce: str, chunk: int, spinning: bool = True
) -> Any:
    """The CacheJob every cache-teacher path of this benchmark runs (CPU, no progress bar)."""
    from kdpipe.cache_teacher import CacheJob

    return CacheJob(
        teacher=path,
        data=npz,
        out=str(out),
        batch_size=batch,
        threads=threads,
        reduce=reduce,
        chunk_size=chunk,
        provider="cpu",
        progress=False,
        spinning=spinning,
    )


def cache_fn(
    path: str,
    npz: str,
    folder: Path,
    batch: int,
    threads: int,
    reduce: str,
    chunk: int,
    steady: list[float],
    spinning: bool = True,
) -> Callable[[], None]:
    """End-to-end cache-teacher; also appends the run's steady-state img/s to ``steady``: the images
    after the first chunk over the time from the start of the second chunk's teacher run to the end of
    the job (the last journaled write). That leaves out the one-time work (teacher load, graph surgery,
    session creation, the first chunk's preparation and the first batches' memory warm-up), which a
    real job pays once, as plain inference with a warm session does not pay it here at all."""
    import kdpipe.cache_teacher as ct

    n = int(np.load(npz)["y"].shape[0])

    def run() -> None:
        out = folder / f"cache-{reduce}"
        shutil.rmtree(out, ignore_errors=True)
        starts: list[float] = []
        run_batches = ct._run_batches

        def timed_run_batches(*a: Any, **k: Any) -> Any:
            starts.append(time.perf_counter())
            return run_batches(*a, **k)

        ct._run_batches = timed_run_batches
        try:
            s = ct.cache_teacher(
                cache_job(path, npz, out, batch, threads, reduce, chunk, spinning), log=lambda _m: None
            )
            end = time.perf_counter()
        finally:
            ct._run_batches = run_batches
        assert s["complete"] and s["items_done"] == n and len(starts) >= 2
        steady.append((n - min(chunk, n)) / (end - starts[1]))

    return run


@contextlib.contextmanager
def stage_timers() -> Iterator[dict[str, float]]:
    """Wrap the stages of kdpipe.cache_teacher / kdpipe.teacher.runner with timers (profiling only)."""
    import kdpipe.cache_teacher as ct
    import kdpipe.teacher.runner as tr
    from kdpipe import ops
    from kdpipe.cache.writer import CacheWriter

    acc: dict[str, float] = {}
    patched: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, attr: str, label: str) -> None:
        orig = getattr(owner, attr)

        def timed_call(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t0

        patched.append((owner, attr, orig))
        setattr(owner, attr, timed_call)

    wrap(ct, "_prepare", "prepare views+preprocess (bg thread)")
    wrap(ct, "_run_batches", "runner.run (all)")
    wrap(tr.TeacherRunner, "_forward", "  session.run")
    wrap(tr.ops, "dct_targets", "  dct_targets")
    wrap(tr.ops, "tap_targets", "  tap_targets (native)")
    wrap(ops, "to_storage", "to_storage")
    wrap(CacheWriter, "write_chunk", "write_chunk (+fsync)")
    try:
        yield acc
    finally:
        for owner, attr, orig in reversed(patched):
            setattr(owner, attr, orig)


def graph_cost(path: str, xf: np.ndarray, batch: int, threads: int, runs: int = 10) -> dict[str, Any]:
    """Kernel time of the nodes ``--reduce graph`` adds, from onnxruntime's own profiler.

    The teacher with all targets appended runs ``runs`` batches (after 2 warm-up batches) with
    profiling on; the added nodes (names starting with ``kdpipe__``) plus the layout conversions
    (``ReorderOutput``) beyond those of the plain teacher are summed and divided by the kernel time of
    all nodes in the same runs. A ratio within the same runs does not drift with the machine's speed.
    """
    import json as json_mod

    import onnxruntime as ort

    from kdpipe.teacher import auto_taps, load_teacher
    from kdpipe.teacher.surgery import append_reductions

    def kernel_ms(model_bytes: bytes, names: list[str] | None, prefix: str) -> dict[str, float]:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"kdpipe-bench-{prefix}")
        sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: xf[:batch]}
        for _ in range(runs + 2):
            sess.run(names, feed)
        prof = Path(sess.end_profiling())
        events = json_mod.loads(prof.read_text())
        prof.unlink()
        per_node: dict[str, list[float]] = {}
        ops: dict[str, str] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                node = e["name"][: -len("_kernel_time")]
                per_node.setdefault(node, []).append(e["dur"] / 1000)
                ops[node] = e["args"].get("op_name", "")
        out = {"all": 0.0, "added": 0.0, "reorder": 0.0}
        for node, durs in per_node.items():
            ms = sum(durs[-runs:]) / runs  # the warm-up batches left out
            out["all"] += ms
            if node.startswith("kdpipe__"):
                out["added"] += ms
            elif ops[node] == "ReorderOutput":
                out["reorder"] += ms
        return out

    graph = load_teacher(path)
    # the model TeacherRunner runs for all targets (dct: dft-abs) with --reduce graph
    model, outputs = append_reductions(
        graph.model, graph.opset, auto_taps(graph), graph.elem_types, True, True, ("dft-abs",)
    )
    plain = kernel_ms(graph.model.SerializeToString(), None, "plain")
    with_targets = kernel_ms(model.SerializeToString(), [graph.logits_name, *outputs.values()], "graph")
    extra = with_targets["added"] + with_targets["reorder"] - plain["reorder"]
    return {
        "batch": batch,
        "kernel_ms_per_batch": round(with_targets["all"], 2),
        "added_nodes_ms": round(with_targets["added"], 2),
        "layout_conversions_ms": round(with_targets["reorder"], 2),
        "plain_layout_conversions_ms": round(plain["reorder"], 2),
        "targets_share_pct": round(100 * extra / with_targets["all"], 2),
    }


def profile_cache(
    path: str, npz: str, folder: Path, batch: int, threads: int, reduce: str, chunk: int
) -> dict:
    from kdpipe.cache_teacher import cache_teacher

    out = folder / f"profile-{reduce}"
    with stage_timers() as acc:
        t0 = time.perf_counter()
        cache_teacher(cache_job(path, npz, out, batch, threads, reduce, chunk), log=lambda _m: None)
        total = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"total_s": round(total, 3), **{k: round(v, 3) for k, v in acc.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few images, one repeat")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=1024, help="cache-teacher --chunk-size (samples)")
    parser.add_argument("--teachers", default=",".join(TEACHERS))
    parser.add_argument("--profile", action="store_true", help="also break the end-to-end run down")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--no-spinning", dest="spinning", action="store_false", help="cache-teacher threads sleep"
    )
    parser.add_argument("--spin-ab", action="store_true", help="add cache-graph with --no-spin as a path")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats, args.chunk = 512, 1, 256

    from kdpipe import __version__, ops
    from kdpipe.memory import keep_freed_memory

    keep_freed_memory(one_arena=True)  # what cache_teacher() does; first, so that every path runs with it
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-ct-") as tmp:
        folder = Path(tmp)
        npz, xf = make_data(args.images, folder)
        for name in args.teachers.split(","):
            path = export_teacher(name, folder)
            # plain runs twice as often as the others (around each of them), on half the images
            plain_n = max(args.batch, args.images // 2 // args.batch * args.batch)
            fns = {"plain": plain_fn(path, xf[:plain_n], args.batch, args.threads)}
            steady: dict[str, list[float]] = {}
            for reduce in ("graph", "native"):
                fns[f"runner-{reduce}"] = runner_fn(path, xf, args.batch, args.threads, reduce)
                steady[f"cache-{reduce}"] = []
                fns[f"cache-{reduce}"] = cache_fn(
                    path,
                    npz,
                    folder,
                    args.batch,
                    args.threads,
                    reduce,
                    args.chunk,
                    steady[f"cache-{reduce}"],
                    spinning=args.spinning,
                )
            if args.spin_ab:  # the same job with onnxruntime's threads sleeping between operators
                steady["cache-graph no-spin"] = []
                fns["cache-graph no-spin"] = cache_fn(
                    path, npz, folder, args.batch, args.threads, "graph", args.chunk,
                    steady["cache-graph no-spin"], spinning=False,
                )  # fmt: skip
            for fn in fns.values():
                fn()  # warm-up
            for key in steady:
                steady[key].clear()
            # Each round: plain, then every other path (rotated order) each followed by plain again; a
            # path's overhead in a round is against the mean of the two plain runs around it, which
            # cancels the machine's drift to first order (it drifts by 10-20 % over minutes).
            others = [k for k in fns if k != "plain"]
            times: dict[str, list[float]] = {k: [] for k in fns}
            around: dict[str, list[float]] = {k: [] for k in others}  # plain rate around each run
            for rnd in range(args.repeats):
                before = plain_n / timed(fns["plain"], 1, warmup=False)[0]
                times["plain"].append(args.images / before)  # as the time for all the images
                for key in others[rnd % len(others) :] + others[: rnd % len(others)]:
                    times[key] += timed(fns[key], 1, warmup=False)
                    after = plain_n / timed(fns["plain"], 1, warmup=False)[0]
                    times["plain"].append(args.images / after)
                    around[key].append((before + after) / 2)
                    before = after
            r: dict[str, Any] = {k: rate(args.images, t) for k, t in times.items()}
            round_rates = {k: [args.images / t for t in ts] for k, ts in times.items()}
            for key, rates in steady.items():
                round_rates[f"{key} steady"] = rates
                around[f"{key} steady"] = around[key]
                r[f"{key} steady"] = {
                    "best_img_s": round(max(rates), 1),
                    "median_img_s": round(float(np.median(rates)), 1),
                }
            base = r["plain"]["best_img_s"]
            for key, val in r.items():
                val["overhead_pct"] = round(100 * (base / val["best_img_s"] - 1), 1)
                if key == "plain":
                    val.update(overhead_paired_pct=0.0, overhead_paired_iqr_pct=[0.0, 0.0])
                    continue
                per_round = [p / q - 1 for p, q in zip(around[key], round_rates[key], strict=True)]
                val["overhead_paired_pct"] = round(100 * float(np.median(per_round)), 1)
                iqr = np.quantile(per_round, [0.25, 0.75])
                val["overhead_paired_iqr_pct"] = [round(100 * float(q), 1) for q in iqr]
                val["overhead_per_round_pct"] = [round(100 * x, 1) for x in per_round]
            r["graph_cost"] = graph_cost(path, xf, args.batch, args.threads)
            if args.profile:
                r["profile"] = {
                    reduce: profile_cache(path, npz, folder, args.batch, args.threads, reduce, args.chunk)
                    for reduce in ("graph", "native")
                }
            results[name] = r
    result = {
        "benchmark": "cache-teacher",
        "images": args.images,
        "batch": args.batch,
        "threads": args.threads,
        "chunk_size": args.chunk,
        "spinning": args.spinning,
        "repeats": args.repeats,
        "classes": CLASSES,
        "targets": "logits, at, dct (dft-abs), pooled; maps float16, vectors float32",
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "native_ops": ops.native_available(),
            "native_threads": ops.num_threads(),
        },
        "kdpipe": __version__,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{result['images']} images 32x32, batch {result['batch']}, {result['threads']} threads, "
        f"chunk {result['chunk_size']}, best of {result['repeats']}; load average before "
        f"{result['loadavg_before']}, after {result['loadavg_after']}"
    )
    print(
        f"{'teacher':<11}{'path':<21}{'best img/s':>11}{'median img/s':>14}{'best/best':>10}{'paired':>9}"
        f"{'paired IQR':>18}"
    )
    for name, r in result["results"].items():
        for key, val in r.items():
            if key in ("profile", "graph_cost"):
                continue
            print(
                f"{TEACHERS.get(name, name):<11}{key:<21}{val['best_img_s']:>11.0f}"
                f"{val['median_img_s']:>14.0f}{val['overhead_pct']:>9.1f}%{val['overhead_paired_pct']:>8.1f}%"
                f"{'[{:+.1f}, {:+.1f}] %'.format(*val['overhead_paired_iqr_pct']):>18}"
            )
        if "graph_cost" in r:
            gc = r["graph_cost"]
            added, conv, plain_conv = (
                gc["added_nodes_ms"],
                gc["layout_conversions_ms"],
                gc["plain_layout_conversions_ms"],
            )
            print(
                f"{TEACHERS.get(name, name):<11}--reduce graph: added nodes {added} ms + layout conversions "
                f"{conv} ms (plain teacher: {plain_conv}) of {gc['kernel_ms_per_batch']} ms kernel time per "
                f"batch = {gc['targets_share_pct']} %"
            )
        for reduce, prof in r.get("profile", {}).items():
            parts = ", ".join(f"{k.strip()} {v:.2f}" for k, v in prof.items())
            print(f"  profile {reduce} (s): {parts}")


if __name__ == "__main__":
    main()
