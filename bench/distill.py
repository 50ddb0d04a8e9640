"""Benchmark of `kdpipe distill`: the cost of a cached distillation step over a plain CE step.

For each teacher -> student pair (WRN-40-2 -> WRN-16-1, ResNet-56 -> ResNet-20; random weights, the
teacher exported to ONNX) over random 3x32x32 uint8 images, one cache (1 view) is made, then the same
student trains through the real loop (``kdpipe.train.distill``: DataLoader workers, cache gather,
forward with tap hooks, loss, SGD step) with: plain CE (no targets read), cached AT, cached DCT,
cached AFD+KD, and the online teacher (AT, onnxruntime on every batch). A run's time per step is the
median of the intervals between consecutive steps after its first (warm-up) epoch (``steps.jsonl``).
The runs repeat in ``--rounds`` interleaved rounds (order rotated); overheads are medians over rounds
of within-round ratios. Writes bench/results/distill.json and prints a table.

Usage: ``python bench/distill.py [--quick] [--images 2048] [--epochs 3] [--rounds 3] [--pair T:S]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdpipe.cache_teacher import CacheJob, cache_teacher
from kdpipe.train import DistillConfig, distill

RESULTS = Path(__file__).resolve().parent / "results" / "distill.json"
PAIRS = (("wrn_40_2", "wrn_16_1"), ("resnet56", "resnet20"))
CLASSES = 10
# name, method, source: every student/batch is the same within a pair
RUNS = (
    ("ce", "ce", "cache"),
    ("cached AT", "at", "cache"),
    ("cached DCT", "dct", "cache"),
    ("cached AFD+KD", "afd+kd", "cache"),
    ("online AT", "at", "online"),
)


def export_teacher(name: str, path: Path) -> None:
    """A zoo model with random weights (and non-trivial BN statistics) as a self-contained ONNX file."""
    spec = importlib.util.spec_from_file_location("bench_util", Path(__file__).with_name("_util.py"))
    assert spec is not None and spec.loader is not None
    util = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(util)
    util.export_zoo(name, path, num_classes=CLASSES, side=32)


def make_data(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    np.savez(path, x=x, y=rng.integers(0, CLASSES, size=n).astype(np.int64))


def time_run(
    work: Path, tag: str, student: str, method: str, source: str, args: argparse.Namespace
) -> dict[str, Any]:
    out = work / tag
    cfg = DistillConfig(
        data=str(work / "data.npz"),
        out=str(out),
        student=student,
        method=method,
        cache=str(work / "cache") if source == "cache" else None,
        online_teacher=str(work / "teacher.onnx") if source == "online" else None,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=0.05,
        workers=args.workers,
        device="cpu",
        threads=args.threads,
        export_onnx=False,
        progress=False,
    )
    os.environ["KDPIPE_LOG_STEPS"] = "1"
    t0 = time.perf_counter()
    distill(cfg, log=lambda m: None)
    wall = time.perf_counter() - t0
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines() if x.strip()]
    # per-step durations from the step log's "seconds since the epoch began"; epoch 1 = warm-up
    per_step = [
        b["seconds"] - a["seconds"]
        for a, b in zip(steps, steps[1:], strict=False)
        if a["epoch"] == b["epoch"] >= 1
    ]
    return {
        "method": method,
        "source": source,
        "step_ms": 1e3 * statistics.median(per_step),
        "step_ms_p25_p75": [round(1e3 * float(q), 1) for q in np.percentile(per_step, [25, 75])],
        "wall_s": round(wall, 2),
    }


def data_path_ms(work: Path, method: str, source: str, args: argparse.Namespace) -> float | None:
    """Median ms to build one training batch in the main process (images, views, normalisation and, for
    cached methods, the gather of the targets): the part of a step the cache changes."""
    if source != "cache":
        return None
    from kdpipe import cache as cache_mod
    from kdpipe.batches import BatchSource
    from kdpipe.data import load_dataset
    from kdpipe.data.preprocess import Normalize
    from kdpipe.data.views import ViewPolicy
    from kdpipe.losses import parse_method
    from kdpipe.train import target_names_for

    cache = cache_mod.open(str(work / "cache"))
    m = parse_method(method)
    names = target_names_for(m.required_targets, len(cache.manifest["taps"]), "dft-abs")
    src = BatchSource(
        load_dataset(str(work / "data.npz")),
        ViewPolicy.from_dict(cache.manifest["views"]["policy"]),
        Normalize.from_dict(cache.manifest["teacher"]["spec"]["normalize"]),
        cache=cache,
        target_names=tuple(names),
    )
    rng = np.random.default_rng(0)
    times = []
    for _ in range(30):
        samples = rng.choice(args.images, args.batch_size, replace=False).astype(np.int64)
        t = time.perf_counter()
        src[(samples, np.zeros_like(samples))]
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[5:])


def bench_pair(teacher: str, student: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One cache, then ``args.rounds`` rounds of every run in RUNS, the order rotated each round.

    This machine's speed drifts by 10-20 % over minutes, so one run per method compares different
    machine states; every overhead here is the median over rounds of a ratio *within* a round.
    """
    work = root / f"{teacher}-{student}"
    work.mkdir()
    export_teacher(teacher, work / "teacher.onnx")
    make_data(work / "data.npz", args.images)
    t0 = time.perf_counter()
    cache_teacher(
        CacheJob(
            teacher=str(work / "teacher.onnx"),
            data=str(work / "data.npz"),
            out=str(work / "cache"),
            views=1,
            threads=args.threads,
            progress=False,
        ),
        log=lambda m: None,
    )
    cache_s = time.perf_counter() - t0
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(args.rounds):
        order = RUNS[r % len(RUNS) :] + RUNS[: r % len(RUNS)]
        this: dict[str, dict[str, Any]] = {}
        for name, method, source in order:
            tag = name.replace(" ", "-").replace("+", "_") + f"-round{r + 1}"
            this[name] = time_run(work, tag, student, method, source, args)
            print(f"  round {r + 1} {teacher} -> {student}: {name:<14} {this[name]['step_ms']:8.1f} ms/step",
                  flush=True)  # fmt: skip
        rounds.append(this)

    def paired(name: str, base: str = "ce") -> float:
        return statistics.median(rd[name]["step_ms"] / rd[base]["step_ms"] for rd in rounds)

    runs: dict[str, dict[str, Any]] = {}
    for name, method, source in RUNS:
        per_round = [rd[name] for rd in rounds]
        runs[name] = {
            "method": method,
            "source": source,
            "step_ms": statistics.median(x["step_ms"] for x in per_round),
            "step_ms_per_round": [round(x["step_ms"], 1) for x in per_round],
            "overhead_vs_ce": paired(name) - 1,
            "overhead_vs_ce_per_round": [
                round(rd[name]["step_ms"] / rd["ce"]["step_ms"] - 1, 4) for rd in rounds
            ],
            "batch_ms": data_path_ms(work, method, source, args),
        }
    ideal = paired("online AT")  # online / CE: the speed-up of a free teacher
    achieved = statistics.median(rd["online AT"]["step_ms"] / rd["cached AT"]["step_ms"] for rd in rounds)
    return {
        "teacher": teacher,
        "student": student,
        "cache_seconds": round(cache_s, 2),
        "rounds": args.rounds,
        "runs": runs,
        "speedup_cached_at_over_online": achieved,
        "ideal_speedup": ideal,
        "fraction_of_ideal": achieved / ideal,
        "fraction_of_ideal_per_round": [
            round(rd["ce"]["step_ms"] / rd["cached AT"]["step_ms"], 4) for rd in rounds
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: few images, 2 epochs")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is a warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all runs")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the cached runs")
    parser.add_argument("--threads", type=int, default=None, help="torch/onnxruntime threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--pair", action="append", help="TEACHER:STUDENT, e.g. wrn_40_2:wrn_16_1 (repeatable)"
    )
    args = parser.parse_args()
    if args.quick:
        args.images, args.epochs, args.rounds = 512, 2, 1
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-distill-") as tmp:
        chosen = [(t, s) for t, s in PAIRS if not args.pair or f"{t}:{s}" in args.pair]
        pairs = [bench_pair(t, s, args, Path(tmp)) for t, s in chosen]
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "pairs": pairs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    print(
        f"\nCPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, batch {args.batch_size}, "
        f"{args.images} images, {args.workers} workers; load average before {load_before[0]:.2f}, "
        f"after {os.getloadavg()[0]:.2f}"
    )
    print(f"{'teacher -> student':<24}{'step':<16}{'ms/step':>9}{'vs CE':>9}{'batch ms':>10}")
    for p in pairs:
        for name, r in p["runs"].items():
            data = "" if r["batch_ms"] is None else f"{r['batch_ms']:.1f}"
            print(f"{p['teacher'] + ' -> ' + p['student']:<24}{name:<16}{r['step_ms']:>9.1f}"
                  f"{100 * r['overhead_vs_ce']:>+8.1f}%{data:>10}")  # fmt: skip
        print(
            f"{'':<24}cached AT is {p['speedup_cached_at_over_online']:.2f}x faster than online "
            f"(ideal {p['ideal_speedup']:.2f}x = online/CE; {100 * p['fraction_of_ideal']:.0f}% of it)"
        )


if __name__ == "__main__":
    main()
