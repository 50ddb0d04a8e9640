"""Tables and plots of run_long.py's runs: ``python pipelines/evidence/run_long.py --report --out out/long``.

Writes OUT/tables-long.md, docs/results-long.json (every run's summary and per-epoch curves) and
docs/img/long-*.png. A group's row shows mean ± sample standard deviation over the seeds that finished.
For the trained students of MAP_SEED that have a checkpoint it also measures how close their
attention maps are to the teacher's (at_terms.py, OUT/at_terms/RUN.json) and draws their maps beside
the teacher's (kdpipe show-maps, docs/img/long-maps-animals-SAMPLE.png).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# the fixed-teacher comparison, in table and legend order
FIXED_RUNS = ("cache-k0-ce", "cache-k0-kd", "cache-k4-kd", "cache-k8-kd", "cache-k16-kd", "cache-k32-kd",
              "online-fresh-kd")  # fmt: skip
IMG = ROOT / "docs" / "img"
MAP_SEED = 2  # the seed whose checkpoints exist (seeds 0-1 ran in an earlier session, summaries only)
MAP_RUNS = ("ce", "kd", "at", "at+kd", "dct", "dct+kd", "afd+kd", "grad-at")
MAP_SAMPLE = 4000


def load_runs(out: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """data -> group name (run name without -sSEED) -> the runs: summary plus "curve" (epoch records).

    A restored record of an exporting run (the weak teacher, OUT/DATA/recorded/) whose run is absent,
    because the queue skipped it once nothing needed its ONNX, is taken as recorded."""
    table: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for data in sorted({p.parent.name for p in [*out.glob("*/runs"), *out.glob("*/recorded")]}):
        found: dict[str, dict[str, Any]] = {}
        for rec_file in sorted((out / data / "recorded").glob("*.json")):
            found[rec_file.stem] = json.loads(rec_file.read_text())
        runs = out / data / "runs"
        for run in sorted(runs.iterdir()) if runs.is_dir() else []:
            s = run / "summary.json"
            if not s.exists():
                continue
            curve = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
            seed = int(run.name.rsplit("-s", 1)[1])
            found[run.name] = json.loads(s.read_text()) | {"curve": curve, "run_seed": seed}
        for run_name in sorted(found):
            table.setdefault(data, {}).setdefault(run_name.rsplit("-s", 1)[0], []).append(found[run_name])
    return table


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def last(rs: list[dict[str, Any]], key: str) -> list[float]:
    return [r["curve"][-1][key] for r in rs if key in r["curve"][-1]]


def row(name: str, rs: list[dict[str, Any]]) -> str:
    seeds = ",".join(str(r["run_seed"]) for r in rs)
    return (f"| {name} | {len(rs)} ({seeds}) | {ms([r['last_top1'] for r in rs])} | "
            f"{ms([r['best_top1'] for r in rs])} | {ms(last(rs, 'train_top1'))} | "
            f"{statistics.median(r['seconds_per_epoch'] for r in rs):.1f} |")  # fmt: skip


HEAD = ["| run | seeds | last val top-1 % | best val top-1 % | last-epoch train top-1 % | s/epoch |",
        "|---|---|---|---|---|---|"]  # fmt: skip


def fixed_rows(g: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The fixed-teacher table: accuracy, where the best epoch was, and the train/val losses at the end."""
    lines = ["| run | seeds | last val top-1 % | best (epoch) | train KD at the end | val loss min -> last "
             "| train top-1 % |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in FIXED_RUNS:
        rs = g.get(name, [])
        if not rs:
            continue
        c = rs[0]["curve"]
        best = max(range(len(c)), key=lambda i: c[i]["val_top1"])
        vl = [e["val_loss"] for e in c]
        kd = f"{c[-1]['train_kd']:.4f}" if "train_kd" in c[-1] else "-"
        lines.append(f"| {name} | {len(rs)} | {ms([r['last_top1'] for r in rs])} | "
                     f"{c[best]['val_top1']:.2f} ({best + 1}) | {kd} | {min(vl):.3f} -> {vl[-1]:.3f} | "
                     f"{ms(last(rs, 'train_top1'))} |")  # fmt: skip
    return lines


def mean_curve(rs: list[dict[str, Any]], key: str) -> list[float]:
    n = min(len(r["curve"]) for r in rs)
    return [statistics.mean(r["curve"][i][key] for r in rs) for i in range(n) if key in rs[0]["curve"][i]]


def plots(table: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    for data, g in table.items():
        names = [n for n in g if n.startswith("cache-k8-")]  # every method on the main cache, and the remedy
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n in sorted(names):
            ax.plot(range(1, len(mean_curve(g[n], "val_top1")) + 1), mean_curve(g[n], "val_top1"), label=n)
        ax.set(xlabel="epoch", ylabel="val top-1 % (mean over seeds)", title=f"ResNet-8 on {data}, 30 epochs")
        ax.set_ylim(*((90, 99.5) if data == "animals" else (85, 100.5)))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(IMG / f"long-curves-{data}.png", dpi=110)
        plt.close(fig)
    g = table.get("animals", {})
    fixed = [n for n in FIXED_RUNS if n in g]
    if fixed:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        for n in fixed:
            for ax, key in zip(axes, ("train_loss", "val_loss", "val_top1"), strict=True):
                c = mean_curve(g[n], key)
                ax.plot(range(1, len(c) + 1), c, label=n)
        titles = ("train loss (weighted total)", "val loss (CE)", "val top-1 %")
        for ax, what in zip(axes, titles, strict=True):
            ax.set(xlabel="epoch", title=what)
            ax.grid(alpha=0.3)
        axes[0].set_yscale("log")
        axes[1].set_yscale("log")
        axes[2].set_ylim(95, 99.5)
        axes[2].legend(fontsize=7)
        fig.suptitle("ResNet-8 <- ResNet-20 (kd), animals: cached views K vs an online teacher")
        fig.tight_layout()
        fig.savefig(IMG / "long-fixed-teacher.png", dpi=110)
        plt.close(fig)


def at_terms(out: Path) -> list[str]:
    """The AT distance of each trained student (MAP_RUNS, seed MAP_SEED) to the teacher's cached maps,
    on 8 batches of cached training views: beta * mean (at_S - at_T)**2 per tap, beta = 1000."""
    runs, cache = out / "animals" / "runs", out / "animals" / "cache-k8"
    (out / "at_terms").mkdir(parents=True, exist_ok=True)
    lines = [
        f"| trained student (seed {MAP_SEED}) | CE | AT 28x28 | AT 14x14 | AT 7x7 |",
        "|---|---|---|---|---|",
    ]
    for m in MAP_RUNS:
        run = runs / f"cache-k8-{m}-s{MAP_SEED}"
        ckpt, res = run / "checkpoints" / "last.pt", out / "at_terms" / f"{run.name}.json"
        if not res.exists() and ckpt.exists() and (run / "summary.json").exists():  # finished runs only
            script = str(Path(__file__).with_name("at_terms.py"))
            cmd = [sys.executable, script, str(cache), "--data", "animals", "--checkpoint", str(ckpt)]
            cmd += ["--out", str(res)]
            if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:  # the tables still get written
                print(f"at_terms.py failed on {run.name}; its row is left out", file=sys.stderr)
        if res.exists():
            mean = json.loads(res.read_text())["mean"]
            terms = " | ".join(f"{mean[f'at.{i}']:.3f}" for i in range(3))
            lines.append(f"| `{m}` | {mean['ce']:.3f} | {terms} |")
    return lines


def maps_figure(out: Path) -> None:
    runs = [out / "animals" / "runs" / f"cache-k8-{m}-s{MAP_SEED}" for m in ("ce", "at", "at+kd")]
    if all((r / "summary.json").exists() and (r / "checkpoints" / "last.pt").exists() for r in runs):
        args = [str(out / "animals" / "cache-k8"), "--sample", str(MAP_SAMPLE)]
        args += [x for r in runs for x in ("--run", str(r))]
        r = subprocess.run([sys.executable, "-m", "kdpipe", "show-maps", *args, "--out",
                            str(IMG / f"long-maps-animals-{MAP_SAMPLE}.png")])  # fmt: skip
        if r.returncode != 0:
            print("show-maps failed; no maps figure", file=sys.stderr)


def report(out: Path, epochs: int) -> None:
    table = load_runs(out)
    (ROOT / "docs" / "results-long.json").write_text(json.dumps(table, indent=1))
    lines: list[str] = []
    for data, g in table.items():
        lines += [f"\n### {data} ({epochs} epochs)\n", *HEAD]
        lines += [row(n, rs) for n, rs in g.items()]
    if "animals" in table:
        lines += ["\n### fixed teacher\n", *fixed_rows(table["animals"])]
    lines += ["\n### AT distance to the teacher's maps\n", *at_terms(out)]
    (out / "tables-long.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plots(table)
    maps_figure(out)
