"""The long-schedule evidence of docs/results.md (issue 16): every number there comes from this script.

    python pipelines/evidence/run_long.py --jobs 2 --out out/long                 # the queue, in order
    python pipelines/evidence/run_long.py --jobs 2 --out out/long --only fixed,weak
    python pipelines/evidence/run_long.py --report --out out/long                 # tables, plots -> docs/
    python pipelines/evidence/run_long.py --restore docs/results-long.json --out out/long  # a new machine

30 epochs (``--epochs``), batch 128, lr 0.05 cosine, 1 torch thread per run; ``--jobs`` runs that many
at once (one per core). Groups, in the order the queue runs them (``--list`` prints the queue):

- ``methods``: every method against the plain student, ResNet-8 (3 seeds) and WRN-16-2, from one
  K = 8 cache of the ResNet-20 teacher (``grad-at`` from a K = 8 cache that also holds J_T);
- ``fixed``: the fixed-teacher regime (Beyer et al. 2022): ``kd`` from caches of K = 0 (the plain
  input only), 4, 8, 16, 32 views, and from an online teacher that sees a fresh view every epoch;
  plus the plain student on the plain input (``k0-ce``), which separates missing augmentation from
  a fixed teacher;
- ``holdout``: AT's remedies (tap weights, a beta warm-up) trained on 7/8 of the
  training split and scored on the other 1/8 (``animals-fit.npz``), never on the val split;
  ``remedy``: the best of them on the real split, 3 seeds (chosen when the held-out runs are done);
- ``preact``: AT on the pre-activation residual sums of teacher and student;
- ``weak``: a ResNet-8 teacher (trained here, seed 100) distilled into ResNet-8 students;
- ``digits``: the methods on digits.

Runs whose summary.json exists are skipped, so the script resumes after an interruption; each cache
is built once (1 onnxruntime thread), by whichever job needs it first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from run_evidence import kdpipe

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "pipelines" / "demo"
METHODS = ["ce", "kd", "at", "at+kd", "dct", "dct+kd", "afd+kd"]
WIDE = "wrn_16_2"
PREACT_TEACHER = "add_112,add_230,add_348"  # the Add before each stage's last ReLU (kdpipe inspect)
PREACT_STUDENT = "layer1.0.preact,layer2.0.preact,layer3.0.preact"
GRAD_TARGETS = "logits,at,pooled,grad"
# AT remedies scored on the held-out part of the training split
REMEDIES = {
    "paper": (),
    "taps": ("--at-tap-weights", "1,0.25,0.0625"),  # every tap the same largest term, 4 beta / 784
    "warm10": ("--term-warmup", "at=10"),  # beta ramped from 0 over the first third
}


@dataclass
class Job:
    """One distill run: ``out/DATA/runs/NAME``; ``args`` may be a callable (resolved when it starts)."""

    group: str
    data: str
    name: str
    args: list[str] | Callable[[], list[str] | None]  # None: skip the run
    caches: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)  # "DATA/NAME" of the jobs whose results ``args`` reads
    export: bool = False  # keep its student.onnx (a teacher for a later cache)

    @property
    def key(self) -> str:
        return f"{self.data}/{self.name}"  # names repeat across datasets (cache-k8-ce-s0 on each)


class Queue:
    """Caches (built once, under a lock) and jobs (a thread pool, first in, first out)."""

    def __init__(self, out: Path, epochs: int) -> None:
        self.out, self.epochs = out, epochs
        self.caches: dict[str, tuple[list[str], list[str]]] = {}  # key -> (cache-teacher args, after jobs)
        self.locks: dict[str, threading.Lock] = {}
        self.futures: dict[str, Future] = {}
        self.jobs: list[Job] = []

    def cache_path(self, key: str) -> Path:
        data, name = key.split("/")
        return self.out / data / name

    def add_cache(self, key: str, args: list[str], after: tuple[str, ...] = ()) -> str:
        if key not in self.caches:
            self.caches[key] = (args, list(after))
            self.locks[key] = threading.Lock()
        return str(self.cache_path(key))

    def ensure_cache(self, key: str) -> None:
        from kdpipe import cache as kc

        args, after = self.caches[key]
        with self.locks[key]:
            for name in after:
                self.futures[name].result()
            path = self.cache_path(key)
            wait_for_others("cache-teacher", path)
            try:
                kc.open(path)
                return
            except Exception:  # absent or incomplete: (re)run; cache-teacher resumes a partial one
                pass
            flags = ["--out", str(path), "--threads", "1", "--no-spin", "--no-progress"]
            kdpipe("cache-teacher", *args, *flags, quiet=True)

    def done(self, job: Job) -> bool:
        return (self.out / job.data / "runs" / job.name / "summary.json").exists()

    def feeds_nothing(self, job: Job) -> list[str]:
        """The caches built after JOB (from its ONNX) when every run that reads them is done, else []."""
        feeds = [key for key, (_, after) in self.caches.items() if job.key in after]
        if any(not self.done(j) for j in self.jobs if set(j.caches) & set(feeds)):
            return []
        return feeds

    def run(self, job: Job) -> None:
        run = self.out / job.data / "runs" / job.name
        if self.done(job):  # before the caches: a finished run needs none of them
            return
        if feeds := self.feeds_nothing(job):
            print(f"skipped {job.key}: every run that reads {', '.join(feeds)} is done", flush=True)
            return
        for name in job.after:
            self.futures[name].result()
        for key in job.caches:
            self.ensure_cache(key)
        wait_for_others("distill", run)
        if self.done(job):
            return
        if run.exists():
            shutil.rmtree(run)
        args = job.args() if callable(job.args) else job.args
        if args is None:
            print(f"skipped {job.name}: its condition does not hold", flush=True)
            return
        kdpipe("distill", *args, "--epochs", str(self.epochs), "--batch-size", "128", "--lr", "0.05",
               "--workers", "1", "--threads", "1", "--no-progress", "--out", str(run),
               *([] if job.export else ["--no-export"]), quiet=True)  # fmt: skip
        check_rerun(self.out, job)

    def start(self, jobs: int) -> None:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for job in self.jobs:
                self.futures[job.key] = pool.submit(self.run, job)
            failed = []
            for job in self.jobs:
                try:
                    self.futures[job.key].result()
                except Exception as e:  # one failed run does not stop the others
                    failed.append(f"{job.key}: {e}")
        if failed:
            sys.exit("failed runs:\n  " + "\n  ".join(failed))


def wait_for_others(command: str, out: Path) -> None:
    """Wait while another process runs ``kdpipe COMMAND ... --out OUT`` (an earlier queue, stopped and
    restarted in another order, leaves its runs going: they finish, and are then skipped)."""
    import time

    me = str(os.getpid())
    while True:
        live = False
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or proc.name == me:
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if command.encode() in argv and str(out).encode() in argv:
                live = True
                break
        if not live:
            return
        time.sleep(10)


def teacher_cache_args(data: str, views: int, *extra: str, teacher: str | None = None) -> list[str]:
    onnx = teacher or str(DEMO / f"teacher-{data}.onnx")
    card = [] if teacher else ["--card", str(DEMO / f"teacher-{data}.yaml")]
    flip = "--no-flip" if data == "digits" else "--flip"
    return [onnx, *card, "--data", data, "--views", str(views), "--pad", "2", flip, *extra]


def student_args(data: str, cache: str, student: str, method: str, seed: int, *extra: str) -> list[str]:
    return ["--cache", cache, "--data", data, "--val-data", f"{data}:val", "--student", student,
            "--method", method, "--seed", str(seed), *extra]  # fmt: skip


def student_prefix(student: str) -> str:
    """The run-name prefix of a student: none for the default ResNet-8 ("wrn_16_2-" for WRN-16-2)."""
    return "" if student == "resnet8" else f"{student}-"


def holdout_npz(out: Path) -> Path:
    """7/8 of animals' training split as x/y and the other 1/8 (every 8th image of each class) as
    x_val/y_val: the data on which AT's remedies are chosen."""
    from kdpipe.data import load_dataset

    path = out / "animals-fit.npz"
    if not path.exists():
        ds = load_dataset("animals")
        held = np.zeros(len(ds.labels), bool)
        for c in range(ds.num_classes):
            held[np.flatnonzero(ds.labels == c)[::8]] = True
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, x=ds.images[~held], y=ds.labels[~held], x_val=ds.images[held], y_val=ds.labels[held],
                 class_names=np.array(ds.class_names))  # fmt: skip
        tmp.replace(path)
    return path


def best_remedy(out: Path) -> str | None:
    """The remedy with the best last held-out top-1 (ties: the earlier in REMEDIES); None when none
    beats the paper's AT there (then the val split is not spent on it)."""
    scores = {}
    for name in REMEDIES:
        s = out / "fit" / "runs" / f"fit-at-{name}-s0" / "summary.json"
        if s.exists():
            scores[name] = json.loads(s.read_text())["last_top1"]
    best = max(scores, key=lambda k: scores[k])
    return None if best == "paper" else best


def restore(record: Path, out: Path) -> None:
    """Recreate the finished runs of a committed docs/results-long.json under OUT (summary.json and
    metrics.jsonl; no checkpoints), so a queue on a new machine skips them and --report keeps them.
    Runs with an export (the weak teacher, whose ONNX a cache needs) are not restored: they rerun if a
    run that reads that cache is not finished, and their recorded curve goes to OUT/DATA/recorded/,
    which ``check_rerun`` compares the rerun with."""
    n = 0
    for data, groups in json.loads(record.read_text()).items():
        for name, runs in groups.items():
            for r in runs:
                run = out / data / "runs" / f"{name}-s{r['run_seed']}"
                if name.startswith("teacher-"):
                    (out / data / "recorded").mkdir(parents=True, exist_ok=True)
                    (out / data / "recorded" / f"{run.name}.json").write_text(json.dumps(r))
                    continue
                if (run / "summary.json").exists():
                    continue
                if run.exists():  # a half-done run: its checkpoints are not the recorded run's
                    shutil.rmtree(run)
                run.mkdir(parents=True)
                curve = r.pop("curve")
                r.pop("run_seed")
                (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in curve))
                (run / "summary.json").write_text(json.dumps(r | {"restored_from": str(record)}, indent=1))
                n += 1
    print(f"restored {n} runs from {record} into {out}")


def check_rerun(out: Path, job: Job) -> None:
    """A rerun of a restored record (the weak teacher) must give the recorded val curve, or the runs
    distilled from it would mix two teachers: RuntimeError (its dependants then fail too)."""
    rec = out / job.data / "recorded" / f"{job.name}.json"
    if not rec.exists():
        return
    was = [e["val_top1"] for e in json.loads(rec.read_text())["curve"]]
    metrics = (out / job.data / "runs" / job.name / "metrics.jsonl").read_text().splitlines()
    now = [json.loads(x)["val_top1"] for x in metrics if x.strip()]
    if now != was:
        raise RuntimeError(f"{job.key} reran to val top-1 {now[-1:]} but the record says {was[-1:]}: a "
                           "different teacher; restore its ONNX or rerun all that depend on it")  # fmt: skip
    print(f"{job.key}: the rerun gives the recorded val curve exactly ({len(now)} epochs)", flush=True)


A = "animals"


class Plan:
    """The runs of each group, added to a Queue in the order ``order()`` gives (``--list`` shows it)."""

    def __init__(self, q: Queue) -> None:
        self.q, self.add = q, q.jobs.append
        self.main = q.add_cache(f"{A}/cache-k8", teacher_cache_args(A, 8))
        self.k = {k: q.add_cache(f"{A}/cache-k{k}", teacher_cache_args(A, k)) for k in (0, 4, 16, 32)}
        self.grad = q.add_cache(f"{A}/cache-k8-grad", teacher_cache_args(A, 8, "--targets", GRAD_TARGETS))
        self.pre = q.add_cache(f"{A}/cache-k8-preact", teacher_cache_args(A, 8, "--taps", PREACT_TEACHER))
        self.digits_main = q.add_cache("digits/cache-k8", teacher_cache_args("digits", 8))
        self.digits_grad = q.add_cache(
            "digits/cache-k8-grad", teacher_cache_args("digits", 8, "--targets", GRAD_TARGETS)
        )
        self.npz = holdout_npz(q.out)
        fit_data = ["--data", str(self.npz), "--views", "8", "--pad", "2", "--flip"]
        self.fit = q.add_cache("fit/cache-k8", teacher_cache_args(A, 8)[:3] + fit_data)
        weak_teacher = q.out / A / "runs" / "teacher-r8-s100" / "student.onnx"
        self.weak = q.add_cache(f"{A}/cache-k8-weak", teacher_cache_args(A, 8, teacher=str(weak_teacher)),
                                after=(f"{A}/teacher-r8-s100",))  # fmt: skip

    def methods(self, seed: int, student: str = "resnet8", names: list[str] = METHODS) -> None:
        prefix = student_prefix(student)
        for m in names:
            args = student_args(A, self.main, student, m, seed)
            self.add(Job("methods", A, f"{prefix}cache-k8-{m}-s{seed}", args, [f"{A}/cache-k8"]))

    def grad_at(self, data: str, seed: int, student: str = "resnet8") -> None:
        cache = self.grad if data == A else self.digits_grad
        prefix = student_prefix(student)
        args = student_args(data, cache, student, "grad-at", seed)
        self.add(Job("methods" if data == A else "digits", data, f"{prefix}cache-k8-grad-at-s{seed}", args,
                     [f"{data}/cache-k8-grad"]))  # fmt: skip

    def fixed(self, seed: int) -> None:
        args = student_args(A, self.k[0], "resnet8", "ce", seed)
        self.add(Job("fixed", A, f"cache-k0-ce-s{seed}", args, [f"{A}/cache-k0"]))
        for k in (0, 4, 16, 32):
            args = student_args(A, self.k[k], "resnet8", "kd", seed)
            self.add(Job("fixed", A, f"cache-k{k}-kd-s{seed}", args, [f"{A}/cache-k{k}"]))
        online = ["--online-teacher", str(DEMO / "teacher-animals.onnx"), "--teacher-card",
                  str(DEMO / "teacher-animals.yaml"), "--data", A, "--val-data", f"{A}:val", "--student",
                  "resnet8", "--method", "kd", "--seed", str(seed), "--views", str(self.q.epochs),
                  "--augment", "pad-crop", "--view-pad", "2"]  # fmt: skip
        self.add(Job("fixed", A, f"online-fresh-kd-s{seed}", online))

    def holdout(self) -> None:
        base = ["--cache", self.fit, "--data", str(self.npz), "--val-data", f"{self.npz}:val", "--student",
                "resnet8"]  # fmt: skip
        ce = [*base, "--method", "ce", "--seed", "0"]
        self.add(Job("holdout", "fit", "fit-ce-s0", ce, ["fit/cache-k8"]))
        for name, extra in REMEDIES.items():
            args = [*base, "--method", "at", "--seed", "0", *extra]
            self.add(Job("holdout", "fit", f"fit-at-{name}-s0", args, ["fit/cache-k8"]))

    def remedy(self, seed: int) -> None:
        def args() -> list[str] | None:
            best = best_remedy(self.q.out)
            if best is None:
                return None
            return student_args(A, self.main, "resnet8", "at", seed, *REMEDIES[best])

        self.add(Job("remedy", A, f"cache-k8-at-remedy-s{seed}", args, [f"{A}/cache-k8"],
                     after=[f"fit/fit-at-{n}-s0" for n in REMEDIES]))  # fmt: skip

    def weak_runs(self, seed: int, names: tuple[str, ...] = ("kd", "at", "at+kd")) -> None:
        if not any(j.name == "teacher-r8-s100" for j in self.q.jobs):
            args = student_args(A, self.main, "resnet8", "ce", 100)
            self.add(Job("weak", A, "teacher-r8-s100", args, [f"{A}/cache-k8"], export=True))
        for m in names:
            args = student_args(A, self.weak, "resnet8", m, seed)
            self.add(Job("weak", A, f"weak-k8-{m}-s{seed}", args, [f"{A}/cache-k8-weak"]))

    def preact(self, seed: int) -> None:
        args = student_args(A, self.pre, "resnet8", "at", seed, "--student-taps", PREACT_STUDENT)
        self.add(Job("preact", A, f"preact-k8-at-s{seed}", args, [f"{A}/cache-k8-preact"]))

    def digits(self, seed: int) -> None:
        d, cache = "digits", self.digits_main
        for m in METHODS:
            self.add(Job("digits", d, f"cache-k8-{m}-s{seed}", student_args(d, cache, "resnet8", m, seed),
                         [f"{d}/cache-k8"]))  # fmt: skip
        self.grad_at(d, seed)

    def digits_remedy(self, seed: int) -> None:
        """The tap weights that the animals held-out split picked, on digits as they are (not re-tuned)."""
        d = "digits"
        args = student_args(d, self.digits_main, "resnet8", "at", seed, *REMEDIES["taps"])
        self.add(Job("digits", d, f"cache-k8-at-taps-s{seed}", args, [f"{d}/cache-k8"]))

    def order(self) -> list[tuple[str, Callable[[], object]]]:
        """(group, adds its runs): the queue's order, the one the runs were made in."""
        return [
            ("methods", lambda: self.methods(0)),
            ("fixed", lambda: self.fixed(0)),
            ("holdout", self.holdout),
            ("weak", lambda: self.weak_runs(0)),
            ("preact", lambda: self.preact(0)),
            ("methods", lambda: self.methods(1, names=["ce", "kd", "at", "at+kd"])),
            ("methods", lambda: self.methods(0, WIDE, ["ce", "at"])),
            ("remedy", lambda: [self.remedy(s) for s in (0, 1, 2)]),
            ("methods", lambda: self.methods(1, names=["dct", "dct+kd", "afd+kd"])),
            ("methods", lambda: self.methods(2, names=["ce", "kd", "at", "at+kd"])),
            ("methods", lambda: self.methods(2, names=["dct", "dct+kd", "afd+kd"])),
            ("methods", lambda: [self.grad_at(A, s) for s in (0, 1, 2)]),
            ("digits", lambda: self.digits(0)),
            ("digits", lambda: self.digits(1)),
            ("fixed", lambda: self.fixed(1)),
            ("weak", lambda: self.weak_runs(1)),
            ("preact", lambda: self.preact(1)),
            ("digits", lambda: self.digits(2)),
            ("digits", lambda: [self.digits_remedy(s) for s in (0, 1, 2)]),
            ("preact", lambda: self.preact(2)),
            ("methods", lambda: self.methods(0, WIDE, ["kd", "at+kd"])),
            ("fixed", lambda: self.fixed(2)),
            ("weak", lambda: self.weak_runs(2)),
            ("methods", lambda: self.methods(1, WIDE, ["ce", "kd"])),
            ("methods", lambda: self.methods(1, WIDE, ["at", "at+kd"])),
            ("methods", lambda: self.methods(2, WIDE, ["ce", "kd", "at", "at+kd"])),
            ("methods", lambda: [self.methods(s, WIDE, ["dct", "dct+kd", "afd+kd"]) for s in (0, 1, 2)]),
            ("methods", lambda: [self.grad_at(A, s, WIDE) for s in (0, 1, 2)]),
        ]


def plan(q: Queue, groups: set[str]) -> None:
    for group, add_runs in Plan(q).order():
        if group in groups:
            add_runs()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/long")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (1 torch thread each)")
    ap.add_argument("--only", default="methods,fixed,holdout,remedy,weak,preact,digits")
    ap.add_argument("--list", action="store_true", help="print the queue and stop")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--restore", metavar="JSON", help="recreate the finished runs of a results-long.json")
    a = ap.parse_args()
    out = Path(a.out)
    if a.restore:
        restore(Path(a.restore), out)
        return
    if a.report:
        from report_long import report

        report(out, a.epochs)
        return
    q = Queue(out, a.epochs)
    plan(q, set(a.only.split(",")))
    if a.list:
        print("\n".join(f"{j.group:8s} {j.data}/runs/{j.name}" for j in q.jobs))
        return
    q.start(a.jobs)


if __name__ == "__main__":
    main()
