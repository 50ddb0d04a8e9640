"""Before/after timing of the distill step, two source trees alternated run by run.

Each run is bench/distill.py's own ``time_run`` (the real loop through ``kdpipe.train.distill``),
imported from one tree in a fresh process, on one shared cache, with one thread and no DataLoader
workers, so that all the work is in that process. Two numbers per run:

- *wall ms/step*: bench/distill.py's measure (median interval between steps after the warm-up epoch);
- *CPU ms/step*: the process's CPU time (user + system) of a run of ``--epochs`` epochs minus that of
  a 2-epoch run, over the steps in between. It cancels the set-up (imports, model, cache opening)
  and, unlike wall time, hardly moves when other jobs share the CPUs.

This machine drifts by 10-20 % over minutes and other jobs may share its CPUs, so ``before`` and
``after`` run back to back for every method, their order swapped every round; the result is the median
over rounds of the within-round ratio.

Usage: ``python bench/distill_ab.py BEFORE_TREE AFTER_TREE [--rounds 6] [--images 1024]``, e.g.
``git worktree add /tmp/base 3fc5873``, copy ``kdpipe/_native*.so`` into both trees' ``kdpipe/``
folders (worktrees of committed code), then ``python bench/distill_ab.py /tmp/base /tmp/after``.
Writes bench/results/distill-ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# In a fresh process: TREE's kdpipe first on the path (ahead of an editable install), then
# TREE/bench/distill.py's time_run on the prepared work folder; prints its result as JSON.
_SHIM = """
import argparse, json, resource, runpy, sys
tree, work, tag, student, method, source, epochs, batch = sys.argv[1:9]
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, tree)
bench = runpy.run_path(tree + "/bench/distill.py", run_name="bench")
args = argparse.Namespace(epochs=int(epochs), batch_size=int(batch), workers=0, threads=1)
from pathlib import Path
result = bench["time_run"](Path(work), tag, student, method, source, args)
use = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps(result | {"cpu_s": use.ru_utime + use.ru_stime}))
"""

METHODS = (("ce", "ce"), ("cached AT", "at"))


_PREP = """
import runpy, sys
from pathlib import Path
tree, work, teacher, images = sys.argv[1:5]
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, tree)
b = runpy.run_path(tree + "/bench/distill.py", run_name="bench")
w = Path(work)
b["export_teacher"](teacher, w / "teacher.onnx")
b["make_data"](w / "data.npz", int(images))
from kdpipe.cache_teacher import CacheJob, cache_teacher
job = CacheJob(teacher=str(w / "teacher.onnx"), data=str(w / "data.npz"), out=str(w / "cache"), views=1,
               progress=False)
cache_teacher(job, log=lambda m: None)
"""


def prepare(tree: Path, work: Path, teacher: str, images: int) -> None:
    """Teacher ONNX, random images and a 1-view cache, made once with ``tree``'s bench helpers."""
    subprocess.run([sys.executable, "-c", _PREP, str(tree), str(work), teacher, str(images)], check=True)


def time_one(
    tree: Path, work: Path, tag: str, student: str, method: str, args: argparse.Namespace
) -> tuple[float, float]:
    """(wall ms/step, CPU ms/step) of one method on one tree."""

    def run(epochs: int) -> dict:
        cmd = [sys.executable, "-c", _SHIM, str(tree), str(work), f"{tag}-e{epochs}", student, method,
               "cache", str(epochs), str(args.batch_size)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return dict(json.loads(out.strip().splitlines()[-1]))

    short, long = run(2), run(args.epochs)  # 2: time_run needs a timed epoch after the warm-up
    steps = (args.epochs - 2) * (args.images // args.batch_size)
    return float(long["step_ms"]), 1e3 * (long["cpu_s"] - short["cpu_s"]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=4, help="of the long run (the short one has 2)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pair", default="wrn_40_2:wrn_16_1", help="TEACHER:STUDENT")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distill-ab.json")
    args = parser.parse_args()
    teacher, student = args.pair.split(":")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    rounds: list[dict[str, dict[str, tuple[float, float]]]] = []
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-ab-") as tmp:
        work = Path(tmp)
        prepare(trees["after"], work, teacher, args.images)
        for r in range(args.rounds):
            this: dict[str, dict[str, tuple[float, float]]] = {"before": {}, "after": {}}
            for name, method in METHODS:
                for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                    tag = f"{side}-{method}-{r}".replace("+", "_")
                    this[side][name] = time_one(trees[side], work, tag, student, method, args)
                (bw, bc), (aw, ac) = this["before"][name], this["after"][name]
                print(f"round {r + 1} {name:<10} wall {bw:7.1f} -> {aw:7.1f} ms/step "
                      f"({100 * (aw / bw - 1):+.1f} %)   CPU {bc:7.1f} -> {ac:7.1f} ms/step "
                      f"({100 * (ac / bc - 1):+.1f} %)", flush=True)  # fmt: skip
            rounds.append(this)
            report(rounds, args)


def report(rounds: list[dict[str, dict[str, tuple[float, float]]]], args: argparse.Namespace) -> None:
    """Write the JSON (after every round, so that a stopped run keeps its rounds) and print medians."""
    runs: dict[str, dict[str, object]] = {}
    for name, _ in METHODS:
        for k, what in ((0, "wall"), (1, "cpu")):
            before = [rd["before"][name][k] for rd in rounds]
            after = [rd["after"][name][k] for rd in rounds]
            runs.setdefault(name, {})[what] = {
                "before_ms": [round(x, 1) for x in before],
                "after_ms": [round(x, 1) for x in after],
                "after_vs_before_median": statistics.median(
                    a / b - 1 for a, b in zip(after, before, strict=True)
                ),
            }
    settings = {k: str(v) for k, v in vars(args).items() if k != "out"}
    load = os.getloadavg()
    args.out.write_text(
        json.dumps({"settings": settings, "loadavg_after": load, "runs": runs}, indent=2) + "\n"
    )
    for name, v in runs.items():
        for what, m in v.items():
            assert isinstance(m, dict)
            print(f"{name:<10} {what:<4} before {statistics.median(m['before_ms']):7.1f}  after "
                  f"{statistics.median(m['after_ms']):7.1f} ms/step (medians); median within-round change "
                  f"{100 * m['after_vs_before_median']:+.1f} %")  # fmt: skip


if __name__ == "__main__":
    main()
