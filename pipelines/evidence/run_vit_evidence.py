"""The transformer-teacher evidence of docs/results.md (issue 15): ResNet-8 students of the committed ViT
teacher ``pipelines/demo/teacher-vit-animals.onnx``.

    python pipelines/evidence/run_vit_evidence.py --epochs 8 --seeds 0 1 2 --shard 0/2 --out out/vit &
    python pipelines/evidence/run_vit_evidence.py --epochs 8 --seeds 0 1 2 --shard 1/2 --out out/vit
    python pipelines/evidence/run_vit_evidence.py --report --out out/vit

The cache holds K = 8 pad-crop (pad 2) + flip views of every block (``--taps auto``: 6 blocks) with
the class-token attention; the students pair their 3 stages with blocks 2, 4, 6 (AT, DCT) or attend
over all 6 (AFD). The training runs are those of ``run_evidence.py`` (same student, batch, lr,
schedule); ``--shard i/n`` runs every n-th (method, seed) so two processes share two cores. Runs whose
summary.json exists are skipped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from run_evidence import DEMO, THREADS, kdpipe, summarise, train

TEACHER = DEMO / "teacher-vit-animals"
METHODS = ["ce", "kd", "at+kd", "dct+kd", "afd+kd"]
DATA = "animals"


def cache(out: Path, views: int) -> Path:
    path = out / DATA / f"cache-k{views}"
    kdpipe("cache-teacher", f"{TEACHER}.onnx", "--card", f"{TEACHER}.yaml", "--data", DATA, "--views",
           str(views), "--pad", "2", "--out", str(path), "--targets", "logits,at,pooled,attn",
           "--no-progress")  # fmt: skip
    return path


def outliers(cache_dir: Path, q: float = 0.9) -> list[str]:
    """Do a few cells dominate the teacher's at maps? Every 4th sample, view 0, per block, as cached and
    clipped at the q-quantile (``--token-clip``; on 49 cells q = 0.98 would clip nothing)."""
    import numpy as np

    from kdpipe import cache as cache_mod
    from kdpipe.teacher.outliers import clip_maps, outlier_stats

    c = cache_mod.open(str(cache_dir))
    s = np.arange(0, len(c), 4)
    head = (
        f"| block | largest cell's share of sum(at**2) | max / median | clipped at {q}: share | max/median |"
    )
    lines = [head, "|---|---|---|---|---|"]
    for i, tap in enumerate(c.manifest["taps"]):
        at = c.gather(f"at.{i}", s, np.zeros_like(s))
        a, b = outlier_stats(at), outlier_stats(clip_maps(at, q))
        lines.append(f"| {tap.get('block', i)} | {a['top_cell_mass']:.3f} | {a['max_over_median']:.2f} | "
                     f"{b['top_cell_mass']:.3f} | {b['max_over_median']:.2f} |")  # fmt: skip
    return lines


def report(out: Path) -> None:
    table = summarise(out)
    (out / "evidence.json").write_text(json.dumps(table, indent=2))
    lines = ["| run | seeds | last top-1 % | best top-1 % | s/epoch |", "|---|---|---|---|---|"]
    for name, g in table[DATA].items():
        lines.append(f"| {name} | {g['n']} | {g['last_mean']:.2f} ± {g['last_std']:.2f} | "
                     f"{g['best_mean']:.2f} ± {g['best_std']:.2f} | {g['s_per_epoch']:.1f} |")  # fmt: skip
    runs = out / DATA / "runs"
    img = DEMO.parents[1] / "docs" / "img"
    for sample in (3, 5000):
        kdpipe("show-maps", str(out / DATA / "cache-k8"), "--sample", str(sample), "--run",
               str(runs / "vit-k8-ce-s0"), "--run", str(runs / "vit-k8-at+kd-s0"), "--out",
               str(img / f"maps-vit-{DATA}-{sample}.png"))  # fmt: skip
    lines += ["", *outliers(out / DATA / "cache-k8")]
    (out / "tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th (method, seed), starting at i")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="out/vit")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report:
        report(out)
        return
    THREADS[:] = ["--threads", str(args.threads)]
    i, n = (int(v) for v in args.shard.split("/"))
    main_cache = out / DATA / f"cache-k{args.views}"
    if i == 0:
        cache(out, args.views)
    jobs = [(m, s) for s in args.seeds for m in METHODS][i::n]
    for method, seed in jobs:
        while not (main_cache / "shards" / "00000-of-00001" / "COMPLETE.json").exists():
            time.sleep(10)  # the other shard waits for shard 0's cache
        train(
            DATA, out, f"vit-k{args.views}-{method}", method, seed, args.epochs, ["--cache", str(main_cache)]
        )


if __name__ == "__main__":
    main()
