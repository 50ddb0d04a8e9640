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

The paths run in ``--repeats`` interleaved rounds, in an order rotated by one each round. Two
overheads relative to ``plain``: *best/best* (best rate of each path) and *paired*, the median (and
quartiles) over rounds of the ratio within a round (the headline: this machine's speed drifts by
10-20 % over minutes, and a ratio within a round cancels most of that). With
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
    """End-to-end cache-teacher; also appends the run's steady-state img/s (first chunk to last
    journaled write, i.e. without the one-time teacher load and session creation) to ``steady``."""
    from kdpipe.cache_teacher import cache_teacher

    n = int(np.load(npz)["y"].shape[0])

    def run() -> None:
        out = folder / f"cache-{reduce}"
        shutil.rmtree(out, ignore_errors=True)
        s = cache_teacher(
            cache_job(path, npz, out, batch, threads, reduce, chunk, spinning), log=lambda _m: None
        )
        assert s["complete"] and s["items_done"] == n
        steady.append(float(s["items_per_s"]))

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
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats, args.chunk = 512, 1, 256

    from kdpipe import __version__, ops
    from kdpipe.memory import keep_freed_memory

    keep_freed_memory()  # what cache_teacher() does; applied first so that every path runs with it
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-ct-") as tmp:
        folder = Path(tmp)
        npz, xf = make_data(args.images, folder)
        for name in args.teachers.split(","):
            path = export_teacher(name, folder)
            fns = {"plain": plain_fn(path, xf, args.batch, args.threads)}
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
            times: dict[str, list[float]] = {k: [] for k in fns}
            for fn in fns.values():
                fn()  # warm-up
            keys = list(fns)
            for r in range(args.repeats):  # interleaved rounds: load changes hit every path alike
                for key in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotated: no path always first
                    times[key] += timed(fns[key], 1, warmup=False)
            r: dict[str, Any] = {k: rate(args.images, t) for k, t in times.items()}
            round_rates = {k: [args.images / t for t in ts] for k, ts in times.items()}
            for key, rates in steady.items():
                rates = rates[1:]  # drop the warm-up call
                round_rates[f"{key} steady"] = rates
                r[f"{key} steady"] = {
                    "best_img_s": round(max(rates), 1),
                    "median_img_s": round(float(np.median(rates)), 1),
                }
            base = r["plain"]["best_img_s"]
            for key, val in r.items():
                val["overhead_pct"] = round(100 * (base / val["best_img_s"] - 1), 1)
                # the machine's speed drifts between rounds: the headline is the median of within-round ratios
                per_round = [p / q - 1 for p, q in zip(round_rates["plain"], round_rates[key], strict=True)]
                val["overhead_paired_pct"] = round(100 * float(np.median(per_round)), 1)
                iqr = np.quantile(per_round, [0.25, 0.75])
                val["overhead_paired_iqr_pct"] = [round(100 * float(q), 1) for q in iqr]
                val["overhead_per_round_pct"] = [round(100 * x, 1) for x in per_round]
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
            if key == "profile":
                continue
            print(
                f"{TEACHERS.get(name, name):<11}{key:<21}{val['best_img_s']:>11.0f}"
                f"{val['median_img_s']:>14.0f}{val['overhead_pct']:>9.1f}%{val['overhead_paired_pct']:>8.1f}%"
                f"{'[{:+.1f}, {:+.1f}] %'.format(*val['overhead_paired_iqr_pct']):>18}"
            )
        for reduce, prof in r.get("profile", {}).items():
            parts = ", ".join(f"{k.strip()} {v:.2f}" for k, v in prof.items())
            print(f"  profile {reduce} (s): {parts}")


if __name__ == "__main__":
    main()
