"""The evidence of docs/results.md: every number there comes from this script.

    python pipelines/evidence/run_evidence.py --data animals --epochs 8 --seeds 0 1 2 --out out/evidence
    python pipelines/evidence/run_evidence.py --data digits --epochs 20 --part methods --out out/evidence
    python pipelines/evidence/run_evidence.py --report --out out/evidence   # tables, plot, maps -> docs/

For one dataset: cache the committed teacher with K views; train the student with each method and seed
from the cache; the same AT and DCT runs with --online-teacher (same views); and AT+KD with caches of
K = 1, 4, 16 views against an online teacher that sees a fresh view every epoch. ``--part storage``
trains dct+kd and afd+kd from the compact default cache and from one that stores D, pooled vectors
and logits in full (the storage before issue 13). Runs whose
summary.json exists are skipped, so the script resumes after an interruption.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "pipelines" / "demo"
METHODS = ["ce", "kd", "at", "dct", "afd", "at+kd", "dct+kd"]
# --part grad: gradient-based AT against the plain student, from a cache that also holds J_T
# (cheapest first: a grad-at step costs about 3x a CE step, with the flip term about 6x)
GRAD_RUNS = {"ce": ("ce",), "grad-at": ("grad-at",), "grad-at+at": ("grad-at+at",),
             "grad-at-flip": ("grad-at", "--flip-symmetry")}  # fmt: skip
STUDENT = "resnet8"


def kdpipe(*args: str, quiet: bool = False) -> None:
    """Run ``python -m kdpipe ARGS``, echoing the command; ``quiet``: its stdout is dropped (the
    run's files hold the results), stderr still shows."""
    cmd = [sys.executable, "-m", "kdpipe", *args]
    print("+ kdpipe " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if quiet else None)


# the storage of caches before issue 13: D stored, float32 pooled vectors and logits
FULL_STORAGE = ["--targets", "logits,at,dct,pooled", "--vec-dtype", "float32", "--logits", "full"]


def cache(data: str, views: int, out: Path, flip: bool, extra: tuple[str, ...] = (), tag: str = "") -> Path:
    path = out / data / f"cache-k{views}{tag}"
    kdpipe(
        "cache-teacher",
        str(DEMO / f"teacher-{data}.onnx"),
        "--card",
        str(DEMO / f"teacher-{data}.yaml"),
        "--data",
        data,
        "--views",
        str(views),
        "--pad",
        "2",
        "--flip" if flip else "--no-flip",
        "--out",
        str(path),
        "--no-progress",
        *extra,
    )
    return path


THREADS: list[str] = []  # ["--threads", "N"] when set on the command line


def train(
    data: str, out: Path, name: str, method: str, seed: int, epochs: int, source: list[str], *extra: str
) -> None:
    run = out / data / "runs" / f"{name}-s{seed}"
    if (run / "summary.json").exists():
        return
    if run.exists():
        import shutil

        shutil.rmtree(run)
    kdpipe(
        "distill",
        *source,
        "--data",
        data,
        "--val-data",
        f"{data}:val",
        "--student",
        STUDENT,
        "--method",
        method,
        "--epochs",
        str(epochs),
        "--batch-size",
        "128",
        "--lr",
        "0.05",
        "--seed",
        str(seed),
        "--workers",
        "1",
        "--out",
        str(run),
        "--no-progress",
        "--no-export",
        *THREADS,
        *extra,
    )


def run_all(
    data: str, epochs: int, seeds: list[int], out: Path, views: int, part: str, view_seeds: list[int]
) -> None:
    """``part``: all, methods (cached method table), online (cached-vs-online), views (K sweep),
    storage (the compact default cache against one with D, pooled and logits stored in full), grad
    (gradient-based AT; not in "all")."""
    flip = data != "digits"
    if part == "grad":
        c = cache(data, views, out, flip, ("--targets", "logits,at,pooled,grad", *THREADS), "-grad")
        for seed in seeds:
            for name, (m, *extra) in GRAD_RUNS.items():
                train(data, out, f"cache-k{views}-grad-{name}", m, seed, epochs, ["--cache", str(c)], *extra)
        return
    main = cache(data, views, out, flip)
    teacher = str(DEMO / f"teacher-{data}.onnx")
    card = str(DEMO / f"teacher-{data}.yaml")
    online = [
        "--online-teacher",
        teacher,
        "--teacher-card",
        card,
        "--views",
        str(views),
        "--augment",
        "pad-crop",
        "--view-pad",
        "2",
    ]
    if not flip:
        online.append("--no-view-flip")
    if part in ("all", "methods"):
        for seed in seeds:
            for m in METHODS:
                train(data, out, f"cache-k{views}-{m}", m, seed, epochs, ["--cache", str(main)])
    if part in ("all", "online"):
        for seed in seeds:
            for m in ("at", "dct"):
                train(data, out, f"online-k{views}-{m}", m, seed, epochs, online)
    if part == "storage":
        full = cache(data, views, out, flip, tuple(FULL_STORAGE), "-fullstore")
        for seed in seeds:
            for m in ("dct+kd", "afd+kd"):
                train(data, out, f"cache-k{views}-{m}", m, seed, epochs, ["--cache", str(main)])
                train(data, out, f"cache-k{views}-fullstore-{m}", m, seed, epochs, ["--cache", str(full)])
    if part in ("all", "views"):
        fresh = [*online[:5], str(epochs), *online[6:]]  # a fresh view every epoch: the online ideal
        for seed in view_seeds:
            for k in (1, 4, 16):
                c = cache(data, k, out, flip) if k != views else main
                train(data, out, f"cache-k{k}-at+kd", "at+kd", seed, epochs, ["--cache", str(c)])
            train(data, out, "online-fresh-at+kd", "at+kd", seed, epochs, fresh)


def summarise(out: Path) -> dict:
    table: dict = {}
    for data_dir in sorted(p for p in out.iterdir() if (p / "runs").is_dir()):
        groups: dict[str, list[dict]] = {}
        for run in sorted((data_dir / "runs").iterdir()):
            s = run / "summary.json"
            if not s.exists():
                continue
            name = run.name.rsplit("-s", 1)[0]
            summ = json.loads(s.read_text())
            curve = [
                json.loads(line).get("val_top1") for line in (run / "metrics.jsonl").read_text().splitlines()
            ]
            groups.setdefault(name, []).append(summ | {"curve": curve})
        table[data_dir.name] = {
            name: {
                "n": len(rs),
                "last_mean": statistics.mean(r["last_top1"] for r in rs),
                "last_std": statistics.stdev(r["last_top1"] for r in rs) if len(rs) > 1 else 0.0,
                "best_mean": statistics.mean(r["best_top1"] for r in rs),
                "best_std": statistics.stdev(r["best_top1"] for r in rs) if len(rs) > 1 else 0.0,
                "s_per_epoch": statistics.median(r["seconds_per_epoch"] for r in rs),
                "curves": [r["curve"] for r in rs],
            }
            for name, rs in groups.items()
        }
    return table


def report(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarise(out)
    (out / "evidence.json").write_text(json.dumps(table, indent=2))
    docs = ROOT / "docs" / "img"
    docs.mkdir(parents=True, exist_ok=True)
    lines = []
    for data, groups in table.items():
        lines.append(f"\n### {data}\n")
        lines.append("| run | seeds | last top-1 % | best top-1 % | s/epoch |")
        lines.append("|---|---|---|---|---|")
        for name, g in groups.items():
            lines.append(
                f"| {name} | {g['n']} | {g['last_mean']:.2f} ± {g['last_std']:.2f} | "
                f"{g['best_mean']:.2f} ± {g['best_std']:.2f} | {g['s_per_epoch']:.1f} |"
            )
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, g in groups.items():
            if (
                name.startswith("cache-k")
                and any(name.endswith(m) for m in ("-ce", "-kd", "-at+kd", "-dct+kd"))
                or name.startswith("online")
            ):
                curve = [
                    statistics.mean(c[i] for c in g["curves"]) for i in range(min(map(len, g["curves"])))
                ]
                ax.plot(range(1, len(curve) + 1), curve, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 % (mean over seeds)")
        ax.set_title(f"{STUDENT} on {data}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(docs / f"curves-{data}.png", dpi=110)
        plt.close(fig)
        runs = out / data / "runs"
        before, after = runs / "cache-k8-ce-s0", runs / "cache-k8-at+kd-s0"
        if (before / "summary.json").exists() and (after / "summary.json").exists():
            n = json.loads((out / data / "cache-k8" / "manifest.json").read_text())["num_samples"]
            for sample in (3, n // 2):
                kdpipe(
                    "show-maps",
                    str(out / data / "cache-k8"),
                    "--sample",
                    str(sample),
                    "--run",
                    str(before),
                    "--run",
                    str(after),
                    "--out",
                    str(docs / f"maps-{data}-{sample}.png"),
                )
    (out / "tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="animals")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--view-seeds", type=int, nargs="+", default=[0], help="Seeds of the K-views sweep.")
    ap.add_argument("--out", default="out/evidence")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--part", default="all", choices=["all", "methods", "online", "views", "storage", "grad"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads per training run")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report:
        report(out)
    else:
        if args.threads:
            THREADS[:] = ["--threads", str(args.threads)]
        run_all(args.data, args.epochs, args.seeds, out, args.views, args.part, args.view_seeds)


if __name__ == "__main__":
    main()
