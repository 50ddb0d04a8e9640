"""Submit a pipeline to Slurm with sbatch: the cache as an array job (one task per unfinished shard), each
unfinished student as a job after the array (``--dependency=afterok``; torchrun on one node when it asks
for more than one process), and the evaluations as one job after the students.

The job scripts are written to ``WORKDIR/slurm/`` (with their logs) and the job ids to
``WORKDIR/slurm/jobs.json``. Re-submitting resumes: finished shards and students are skipped, the
others continue from what is on disk (cache chunks are journaled; students run with ``--resume``).
Jobs of the same pipeline still queued or running are refused, since two writers of one shard or run
folder would collide.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from kdpipe.errors import KdpipeError
from kdpipe.pipeline.plan import Plan, Step, make_plan
from kdpipe.pipeline.schema import Pipeline, SlurmSettings

_SHARD = "KDPIPE_SHARD_PLACEHOLDER"


def ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (an sbatch ``--array`` spec)."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def job_name(p: Pipeline, what: str) -> str:
    return f"kdpipe-{p.name}-{what}"


def header(p: Pipeline, name: str, s: SlurmSettings, log_name: str) -> list[str]:
    """The #SBATCH lines of one job script."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --output={p.workdir / 'slurm' / log_name}",
        f"#SBATCH --chdir={Path.cwd()}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
    ]
    if s.partition:
        lines.append(f"#SBATCH --partition={s.partition}")
    if s.time:
        lines.append(f"#SBATCH --time={s.time}")
    if s.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={s.cpus_per_task}")
    if s.gpus:
        lines.append(f"#SBATCH --gres=gpu:{s.gpus}")
    if s.mem:
        lines.append(f"#SBATCH --mem={s.mem}")
    lines += [f"#SBATCH {x}" for x in s.extra]
    return lines


def _body(commands: list[str]) -> list[str]:
    # the jobs use this kdpipe (the same virtual environment) whatever PATH the node gives them
    return [
        "set -euo pipefail",
        f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH",
        'echo "kdpipe job ${SLURM_JOB_ID} on $(hostname) at $(date -u +%FT%TZ)" >&2',
        *commands,
    ]


def cache_script(p: Pipeline, step: Step) -> str:
    """The array job script: every task runs the cache command with ``--shard TASK_ID/N``."""
    words = step.words()
    words[words.index("--shard") + 1] = _SHARD
    line = shlex.join(words).replace(_SHARD, f'"${{SLURM_ARRAY_TASK_ID}}/{p.shards}"')
    s = p.slurm["cache"]
    head = header(p, job_name(p, "cache"), s, "cache-%A_%a.out")
    return "\n".join([*head, *_body([line])]) + "\n"


def distill_script(p: Pipeline, step: Step) -> str:
    """One student's job script (torchrun --standalone when it asks for more than one process)."""
    assert step.student is not None
    s = p.slurm["distill"]
    head = header(p, job_name(p, step.student.name), s, f"distill-{step.student.name}-%j.out")
    return "\n".join([*head, *_body([step.command()])]) + "\n"


def evaluate_script(p: Pipeline, steps: list[Step]) -> str:
    """The evaluation job: each `kdpipe evaluate` into a temporary file, renamed when it succeeded."""
    cmds = []
    for st in steps:
        assert st.stdout_to is not None
        tmp = st.stdout_to.with_name(f".{st.stdout_to.name}.${{SLURM_JOB_ID}}.tmp")
        cmds.append(f"{shlex.join(st.words())} > {tmp} && mv {tmp} {shlex.quote(str(st.stdout_to))}")
    head = header(p, job_name(p, "evaluate"), p.slurm["evaluate"], "evaluate-%j.out")
    return "\n".join([*head, *_body(cmds)]) + "\n"


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise KdpipeError(f"--executor slurm: {name} not found on PATH; run this where Slurm's commands are")
    return exe


def active_jobs(names: list[str]) -> list[str]:
    """Ids of queued or running jobs with one of these names (this user's)."""
    r = subprocess.run(
        [_tool("squeue"), "--noheader", "--format=%i %j", f"--name={','.join(names)}"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise KdpipeError(f"squeue failed: {(r.stderr.strip().splitlines() or ['no message'])[-1]}")
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def sbatch(script: Path, options: list[str]) -> str:
    """Submit ``script`` with ``options``; returns the job id."""
    r = subprocess.run([_tool("sbatch"), "--parsable", *options, str(script)], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise KdpipeError(f"sbatch refused {script}: {last}")
    return r.stdout.strip().split(";")[0]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def submit(p: Pipeline, dry_run: bool, log: Callable[[str], None]) -> dict[str, object]:
    """Submit what is left of ``p``; returns (and records in WORKDIR/slurm/jobs.json) the job ids.

    With ``dry_run`` it prints the sbatch commands and the kdpipe command of each job, and submits nothing.
    """
    plan: Plan = make_plan(p, always_resume=True)
    sdir = p.workdir / "slurm"
    names = [job_name(p, "cache"), *(job_name(p, s.name) for s in p.students), job_name(p, "evaluate")]
    if not dry_run:
        busy = active_jobs(names)
        if busy:
            raise KdpipeError(
                f"jobs of pipeline {p.name!r} are still queued or running ({', '.join(busy)}): wait for them "
                f"(squeue --name={names[0]},...) or scancel them, then submit again"
            )
    jobs: dict[str, object] = {}

    def go(label: str, script_name: str, text: str, options: list[str], shown: list[str]) -> str:
        path = sdir / script_name
        if dry_run:
            log(shlex.join(["sbatch", *options, str(path)]))
            for c in shown:
                log(f"#   {c}")
            return f"<{label}>"
        jid = sbatch(_write(path, text), options)
        return jid

    # the cache array: one task per unfinished shard
    todo = [s for s in plan.cache if s.state != "done"]
    for s in plan.cache:
        if s.state == "done":
            log(f"skip {s.name}: {s.reason}")
    cache_id = None
    if todo:
        tasks = ranges([int(s.shard or 0) for s in todo])
        text = cache_script(p, todo[0])
        shown = [text.splitlines()[-1]]
        cache_id = go("cache", "cache.sbatch", text, [f"--array={tasks}"], shown)
        jobs["cache"] = {"id": cache_id, "tasks": tasks}
        if not dry_run:
            log(f"cache-teacher: array job {cache_id} (tasks {tasks} of {p.shards})")

    dep = [f"--dependency=afterok:{cache_id}", "--kill-on-invalid-dep=yes"] if cache_id else []
    student_ids: list[str] = []
    for st in plan.distill:
        assert st.student is not None
        if st.state == "done":
            log(f"skip {st.name}: {st.reason}")
            continue
        text = distill_script(p, st)
        jid = go(st.name, f"distill-{st.student.name}.sbatch", text, dep, [st.command()])
        student_ids.append(jid)
        jobs[f"distill {st.student.name}"] = {"id": jid}
        after = f" (after {cache_id})" if cache_id else ""
        if not dry_run:
            log(f"{st.name}: job {jid}{after}" + (f", torchrun x{st.nproc}" if st.nproc > 1 else ""))

    evals = [s for s in plan.evaluate if s.state != "done"]
    for s in plan.evaluate:
        if s.state == "done":
            log(f"skip {s.name}: {s.reason}")
    if evals:
        edep = [f"--dependency=afterok:{':'.join(student_ids)}", "--kill-on-invalid-dep=yes"]
        edep = edep if student_ids else []
        text = evaluate_script(p, evals)
        jid = go("evaluate", "evaluate.sbatch", text, edep, [s.command() for s in evals])
        jobs["evaluate"] = {"id": jid}
        if not dry_run:
            log(f"evaluate: job {jid}" + (f" (after {', '.join(student_ids)})" if student_ids else ""))
    if not jobs:
        log(f"pipeline {p.name!r}: every step is complete; nothing to submit")
    if not dry_run and jobs:
        _write(sdir / "jobs.json", json.dumps(jobs, indent=1) + "\n")
        log(f"logs: {sdir}/ ; watch with: squeue --name={','.join(names)}")
    return jobs
