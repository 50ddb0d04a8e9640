"""What a run writes as it goes (rank 0 only): RUN/metrics.jsonl (one record per epoch),
RUN/step_metrics.jsonl (one record every ``--log-every`` steps), RUN/steps.jsonl (every step, only with
``KDPIPE_LOG_STEPS=1``: the step-level tests and benchmarks) and TensorBoard event files.

Step records: ``step`` (steps done in total), ``epoch`` (1-based), ``epoch_step`` (0-based), ``lr``,
``loss`` (the weighted total), each unweighted term, ``images_per_s`` (all processes, over the
steps since the previous record) and ``data_wait_s`` (mean seconds per step spent waiting for a batch).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

SCALARS_PER_EPOCH = 50  # the default --log-every aims at this many step records per epoch


def log_interval(log_every: int, steps_per_epoch: int) -> int:
    """``--log-every``, or (0) the interval that gives about SCALARS_PER_EPOCH records an epoch."""
    return log_every if log_every > 0 else max(1, round(steps_per_epoch / SCALARS_PER_EPOCH))


def _tensorboard(folder: Path, purge_step: int | None) -> Any:
    """A SummaryWriter, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises this when the tensorboard package is missing
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


def _keep_lines(path: Path, keep: Any) -> None:
    """Rewrite a .jsonl log with the records ``keep`` accepts, dropping lines torn by a crash or a full
    disk mid-write."""
    if path.exists():
        records = [r for ln in path.read_text().splitlines() if ln.strip() and (r := _record(ln)) is not None]
        path.write_text("".join(json.dumps(r) + "\n" for r in records if keep(r)))


def _record(line: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads(line))
    except ValueError:
        return None


class RunLog:
    """The run's log files; ``enabled=False`` on ranks other than 0 (then every call does nothing)."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool) -> None:
        self.out, self.enabled, self.want_tb = out, enabled, tensorboard
        self.metrics = out / "metrics.jsonl"
        self.step_metrics = out / "step_metrics.jsonl"
        self.every_step = out / "steps.jsonl" if os.environ.get("KDPIPE_LOG_STEPS") else None
        self.tb: Any = None
        self._window = (time.perf_counter(), 0, 0.0)  # start, images, data wait

    def start(self, resumed: dict[str, Any] | None, config: dict[str, Any]) -> None:
        """New run: empty logs. Resumed: drop records past the checkpoint ``resumed`` (a run killed
        between logging and checkpointing would otherwise log those steps twice)."""
        if not self.enabled:
            return
        if resumed is None:
            self.metrics.write_text("")
            self.step_metrics.write_text("")
            (self.out / "steps.jsonl").unlink(missing_ok=True)
        else:
            epoch, step, steps = resumed["epoch"], resumed.get("step_in_epoch", 0), resumed["steps"]
            _keep_lines(self.metrics, lambda r: r["epoch"] <= epoch)
            _keep_lines(self.step_metrics, lambda r: r["step"] <= steps)
            _keep_lines(self.out / "steps.jsonl", lambda r: (r["epoch"], r["step"]) < (epoch, step))
        if self.want_tb:
            self.tb = _tensorboard(
                self.out / "tensorboard", None if resumed is None else resumed["steps"] + 1
            )
            if self.tb is not None:
                self.tb.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def waited(self, images: int, seconds: float) -> None:
        """Count a step's images (all processes) and its wait for data in the current window."""
        start, n, wait = self._window
        self._window = (start, n + images, wait + seconds)

    def step(
        self, steps: int, epoch: int, epoch_step: int, lr: float, values: dict[str, float], window_steps: int
    ) -> None:
        """One step record (``steps``: steps done in total; ``values``: "loss" and each term)."""
        now = time.perf_counter()
        start, images, wait = self._window
        self._window = (now, 0, 0.0)
        if not self.enabled:
            return
        rec = {"step": steps, "epoch": epoch + 1, "epoch_step": epoch_step, "lr": lr, **values,
               "images_per_s": round(images / max(now - start, 1e-9), 1),
               "data_wait_s": round(wait / max(window_steps, 1), 6)}  # fmt: skip
        with open(self.step_metrics, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k in ("lr", *values, "images_per_s", "data_wait_s"):
                self.tb.add_scalar(f"train/{k}", rec[k], steps)

    def every(self, epoch: int, step: int, values: dict[str, float], seconds_in_epoch: float) -> None:
        """The per-step record of KDPIPE_LOG_STEPS=1 (tests and benchmarks)."""
        if self.enabled and self.every_step is not None:
            rec = {"epoch": epoch, "step": step, "loss": values["loss"],
                   "seconds": round(seconds_in_epoch, 6),  # since the epoch began
                   **{k: v for k, v in values.items() if k != "loss"}}  # fmt: skip
            with open(self.every_step, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def epoch(self, record: dict[str, Any], steps: int) -> None:
        """One epoch record (train means and val metrics) in metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k.startswith(("train_", "val_")):
                    self.tb.add_scalar(f"{k.split('_', 1)[0]}/epoch_{k.split('_', 1)[1]}", v, steps)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
