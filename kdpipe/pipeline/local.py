"""Run a pipeline's plan on this machine: each command as its own process, in order.

Done steps are skipped (and said so); a failed step stops the pipeline with one line that says how
to resume (run the same `kdpipe run` again).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from kdpipe.errors import KdpipeError
from kdpipe.pipeline.plan import Plan, Step


class StepFailed(KdpipeError):
    """A step's process exited non-zero (its own message is above, on stderr)."""

    exit_code = 1


def _argv(step: Step) -> list[str]:
    """The real process for a step: this interpreter's kdpipe (or torchrun next to it)."""
    if step.nproc > 1:
        exe = Path(sys.executable).with_name("torchrun")
        runner = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
        return [*runner, *step.words()[1:]]
    return [sys.executable, "-m", "kdpipe", *step.argv]


def run_step(step: Step) -> None:
    """Run one step; evaluate steps write their JSON atomically to ``step.stdout_to``."""
    argv = _argv(step)
    if step.stdout_to is None:
        rc = subprocess.call(argv)
    else:
        step.stdout_to.parent.mkdir(parents=True, exist_ok=True)
        tmp = step.stdout_to.with_name(f".{step.stdout_to.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            rc = subprocess.call(argv, stdout=f)
        if rc == 0:
            os.replace(tmp, step.stdout_to)
        else:
            tmp.unlink(missing_ok=True)
    if rc != 0:
        raise StepFailed(
            f"step {step.name!r} failed (exit {rc}); fix what it says above, then run the same "
            "`kdpipe run` again: finished steps are skipped and this one resumes"
        )


def run_local(plan: Plan, log: Callable[[str], None]) -> None:
    """Run every step of ``plan`` that is not done, in order."""
    if any(s.nproc > 1 for s in plan.distill) and not (
        Path(sys.executable).with_name("torchrun").exists() or shutil.which("torchrun")
    ):
        log("note: torchrun not found beside this Python; using python -m torch.distributed.run")
    for step in plan.steps:
        if step.state == "done":
            log(f"skip {step.name}: {step.reason}")
            continue
        if step.state == "partial":
            log(f"resume {step.name}: {step.reason}")
        log(f"$ {step.command()}")
        run_step(step)
