"""Benchmark of gradient-based AT: a cached grad-at step against a plain CE step and a cached AT step,
and what ``--targets grad`` costs cache-teacher.

A teacher -> student pair of the zoo (random weights, the teacher exported to ONNX) over random
3x32x32 uint8 images: one cache (1 view, default targets + grad) is made, timed against a cache of
the default targets alone; then the student trains through the real loop (bench/distill.py's
``time_run``: ``kdpipe.train.distill``, step times from ``steps.jsonl`` after a warm-up epoch) with
plain CE, cached AT, cached grad-at (double back-propagation) and cached grad-at + flip symmetry.
The runs repeat in ``--rounds`` interleaved rounds (order rotated); ratios are medians over rounds of
within-round ratios (this machine drifts and is shared). Writes bench/results/grad_at.json.

Usage: ``python bench/grad_at.py [--pair resnet20:resnet8] [--images 1024] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import runpy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kdpipe.cache_teacher import CacheJob, cache_teacher

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "grad_at.json"
RUNS = (
    ("ce", "ce"),
    ("cached AT", "at"),
    ("cached grad-at", "grad-at"),
    ("cached grad-at + flip", "grad-at+flip"),
)


def cache_cost(work: Path, targets: tuple[str, ...], tag: str, threads: int) -> dict[str, Any]:
    """Seconds, img/s and bytes per view of one cache-teacher run with ``targets``."""
    job = CacheJob(teacher=str(work / "teacher.onnx"), data=str(work / "data.npz"), out=str(work / tag),
                   views=1, threads=threads, progress=False, targets=targets)  # fmt: skip
    t0 = time.perf_counter()
    s = cache_teacher(job, log=lambda m: None)
    took = time.perf_counter() - t0
    from kdpipe import cache as cache_mod

    return {"targets": list(targets), "seconds": round(took, 2), "items_per_s": s["items_per_s"],
            "bytes_per_view": cache_mod.info(str(work / tag))["bytes_per_view"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", default="resnet20:resnet8")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2, help="epoch 1 is the warm-up")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    args.workers = 0
    load_before = os.getloadavg()[0]
    bench = runpy.run_path(str(HERE / "distill.py"), run_name="bench")
    teacher, student = args.pair.split(":")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-grad-") as tmp:
        work = Path(tmp)
        bench["export_teacher"](teacher, work / "teacher.onnx")
        bench["make_data"](work / "data.npz", args.images)
        default = ("logits", "at", "pooled")
        caches = {
            "default": cache_cost(work, default, "plain-cache", args.threads),
            "with grad": cache_cost(work, (*default, "grad"), "cache", args.threads),
        }
        rounds: list[dict[str, float]] = []
        for r in range(args.rounds):
            order = RUNS[r % len(RUNS) :] + RUNS[: r % len(RUNS)]
            this = {}
            for name, method in order:
                tag = f"{method}-round{r + 1}".replace("+", "_")
                this[name] = bench["time_run"](work, tag, student, method, "cache", args)["step_ms"]
                print(f"  round {r + 1}: {name:<22} {this[name]:8.1f} ms/step", flush=True)
            rounds.append(this)
    runs = {
        name: {
            "method": method,
            "step_ms": statistics.median(rd[name] for rd in rounds),
            "step_ms_per_round": [round(rd[name], 1) for rd in rounds],
            "vs_ce": statistics.median(rd[name] / rd["ce"] for rd in rounds),
            "vs_at": statistics.median(rd[name] / rd["cached AT"] for rd in rounds),
        }
        for name, method in RUNS
    }
    result = {"pair": args.pair, "images": args.images, "batch_size": args.batch_size, "rounds": args.rounds,
              "threads": args.threads, "machine": platform.machine(), "torch": torch.__version__,
              "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
              "cache_teacher": caches, "runs": runs}  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"{'run':<24}{'ms/step':>10}{'x ce':>8}{'x AT':>8}")
    for name, r in runs.items():
        print(f"{name:<24}{r['step_ms']:>10.1f}{r['vs_ce']:>8.2f}{r['vs_at']:>8.2f}")
    for name, c in caches.items():
        print(f"cache-teacher {name}: {c['items_per_s']} img/s, {c['bytes_per_view']:.0f} bytes per view")


if __name__ == "__main__":
    main()
