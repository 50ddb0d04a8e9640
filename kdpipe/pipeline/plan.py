"""The steps of a pipeline as exact kdpipe commands, each with the state of its outputs on disk.

A step is ``done`` when its outputs are complete (a cache shard with a valid COMPLETE.json, a run
folder with summary.json, an evaluation JSON), ``partial`` when it was started (journaled chunks, a
checkpoint) and resumes, and ``todo`` otherwise. A cache-teacher shard resumes by running the same
command again; a distill run resumes with ``--resume``.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError
from kdpipe.pipeline.schema import Pipeline, Student

TORCHRUN = ["torchrun", "--standalone", "--nproc_per_node"]


@dataclass
class Step:
    """One kdpipe command of the pipeline."""

    kind: str  # "cache-teacher" | "distill" | "evaluate"
    name: str  # e.g. "cache-teacher shard 0/3", "distill at_kd", "evaluate teacher"
    argv: list[str]  # the words after `kdpipe`
    state: str  # "done" | "partial" | "todo"
    reason: str  # why it is done / partial (for the log)
    stdout_to: Path | None = None  # evaluate: where its JSON goes
    shard: int | None = None
    nproc: int = 1
    student: Student | None = None
    outputs: list[Path] = field(default_factory=list)

    def words(self) -> list[str]:
        """The full command line (``kdpipe ...`` or ``torchrun ... -m kdpipe ...``)."""
        if self.nproc > 1:
            return [*TORCHRUN, str(self.nproc), "-m", "kdpipe", *self.argv]
        return ["kdpipe", *self.argv]

    def command(self) -> str:
        """The command as one shell line (with its ``> FILE`` for evaluate)."""
        line = shlex.join(self.words())
        return line + (f" > {shlex.quote(str(self.stdout_to))}" if self.stdout_to else "")


@dataclass
class Plan:
    """All steps, in order: cache shards, students, evaluations."""

    pipeline: Pipeline
    cache: list[Step]
    distill: list[Step]
    evaluate: list[Step]

    @property
    def steps(self) -> list[Step]:
        return [*self.cache, *self.distill, *self.evaluate]


def cache_shard_states(p: Pipeline) -> list[tuple[str, str]]:
    """(state, reason) per cache shard; a cache made with other settings fails with one line."""
    from kdpipe.cache import format as fmt
    from kdpipe.cache.reader import read_manifest, shard_state

    root = p.cache_dir
    if not (root / fmt.MANIFEST).exists():
        return [("todo", "")] * p.shards
    manifest, lay = read_manifest(root)
    if lay.num_shards != p.shards:
        raise KdpipeError(
            f"cache {root} was started with {lay.num_shards} shard(s) but the pipeline asks for {p.shards}: "
            f"set cache.shards: {lay.num_shards}, or choose another cache.path"
        )
    made = manifest.get("dataset", {}).get("spec")
    if made != p.train_data:
        raise KdpipeError(
            f"cache {root} was made from dataset {made!r}, the pipeline's data.train is {p.train_data!r}: "
            "choose another cache.path (or workdir)"
        )
    views = p.cache_options.get("views", 0)
    if manifest.get("views", {}).get("count") != views:
        raise KdpipeError(
            f"cache {root} holds {manifest.get('views', {}).get('count')} view(s) per sample, the pipeline "
            f"asks for {views}: choose another cache.path (or workdir)"
        )
    from kdpipe.teacher import load_teacher

    if manifest.get("teacher", {}).get("sha256") != load_teacher(str(p.teacher)).sha256:
        raise KdpipeError(
            f"cache {root} was made from another teacher file than {p.teacher}: choose another cache.path"
        )
    out = []
    for i in range(p.shards):
        st = shard_state(root, manifest, lay, i)
        if st.complete:
            out.append(("done", f"shard {i}/{p.shards} of {root} is complete"))
        elif st.done:
            out.append(("partial", f"{len(st.done)} of {len(st.chunks)} chunk(s) written; resuming"))
        else:
            out.append(("todo", ""))
    return out


def _json_ok(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def make_plan(p: Pipeline, always_resume: bool = False) -> Plan:
    """The plan of ``p`` against what is on disk. ``always_resume``: pass ``--resume`` to every
    distill (batch jobs, which may start after a requeue)."""
    cache_steps = []
    for i, (state, reason) in enumerate(cache_shard_states(p)):
        argv = ["cache-teacher", str(p.teacher), "--data", p.train_data, "--out", str(p.cache_dir)]
        argv += ["--card", str(p.card)] if p.card else []
        argv += [*p.cache_args, "--shard", f"{i}/{p.shards}", "--no-progress"]
        name = "cache-teacher" + (f" shard {i}/{p.shards}" if p.shards > 1 else "")
        cache_steps.append(Step("cache-teacher", name, argv, state, reason, shard=i, outputs=[p.cache_dir]))

    distill_steps, eval_steps = [], []
    for s in p.students:
        out = p.workdir / s.name
        if (out / "summary.json").is_file():
            state, reason = "done", f"{out}/summary.json exists"
        elif (out / "checkpoints" / "last.pt").is_file() or any((out / "checkpoints").glob("step-*.pt")):
            state, reason = "partial", f"{out} holds a checkpoint; resuming"
        else:
            state, reason = "todo", ""
        argv = ["distill", "--cache", str(p.cache_dir), "--data", p.train_data]
        argv += ["--val-data", p.val_data] if p.val_data else []
        argv += ["--out", str(out), *s.args, "--no-progress"]
        argv += ["--resume"] if state == "partial" or always_resume else []
        distill_steps.append(
            Step("distill", f"distill {s.name}", argv, state, reason, nproc=s.nproc, student=s)
        )
        if p.evaluate and p.eval_data and not s.options.get("no_export"):
            target = out / "eval.json"
            done = _json_ok(target)
            argv = ["evaluate", str(out / "student.onnx"), "--data", p.eval_data]
            eval_steps.append(
                Step(
                    "evaluate",
                    f"evaluate {s.name}",
                    argv,
                    "done" if done else "todo",
                    f"{target} exists" if done else "",
                    stdout_to=target,
                    student=s,
                )
            )
    if p.evaluate_teacher and p.eval_data:
        target = p.workdir / "teacher_eval.json"
        done = _json_ok(target)
        argv = [
            "evaluate",
            str(p.teacher),
            *(["--card", str(p.card)] if p.card else []),
            "--data",
            p.eval_data,
        ]
        eval_steps.append(
            Step(
                "evaluate",
                "evaluate teacher",
                argv,
                "done" if done else "todo",
                f"{target} exists" if done else "",
                stdout_to=target,
            )
        )
    return Plan(p, cache_steps, distill_steps, eval_steps)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        out = json.loads(path.read_text())
        return out if isinstance(out, dict) else None
    except (OSError, ValueError):
        return None


def results_table(p: Pipeline) -> str:
    """The final table: the teacher and each student, top-1 on the evaluation data and s/epoch."""
    rows: list[tuple[str, float | None, float | None]] = []
    teacher = _read(p.workdir / "teacher_eval.json")
    if teacher is not None:
        rows.append(("teacher (ONNX, onnxruntime)", teacher.get("top1"), None))
    for s in p.students:
        summary = _read(p.workdir / s.name / "summary.json")
        if summary is None:
            continue
        ev = _read(p.workdir / s.name / "eval.json")
        top1 = ev.get("top1") if ev is not None else summary.get("last_top1")
        label = s.label or (
            f"student {s.name} ({s.options.get('student', 'resnet20')}, {s.options.get('method', 'kd')})"
        )
        rows.append((label, top1, summary.get("seconds_per_epoch")))
    if not rows:
        return ""
    width = max(36, *(len(r[0]) for r in rows))
    lines = [f"\n{'model':<{width}} {'val top-1 %':>11} {'s/epoch':>8}"]
    for label, top1, spe in rows:
        t = "-" if top1 is None else f"{top1:.2f}"
        lines.append(f"{label:<{width}} {t:>11} {'' if spe is None else f'{spe:8.1f}'}")
    return "\n".join(lines)
