"""The end of a run: RUN/summary.json and the one table printed for people."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe import __version__


def git_commit() -> str | None:
    """The commit of the kdpipe source tree in use (with ``-dirty`` if it has local changes), or None
    when kdpipe is not running from a git checkout."""
    where = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


def summarise(
    records: list[dict[str, Any]], epoch_times: list[float], facts: dict[str, Any]
) -> dict[str, Any]:
    """summary.json's content from the epoch records (metrics.jsonl) and the run's facts."""
    tops = [r["val_top1"] for r in records if "val_top1" in r]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    return {
        "best_top1": max(tops) if tops else None,
        "last_top1": tops[-1] if tops else None,
        "last_top5": next((r["val_top5"] for r in reversed(records) if "val_top5" in r), None),
        "epochs": len(records),
        **facts,
        "seconds_per_epoch": float(np.mean(epoch_times)) if epoch_times else None,
        "images_per_s": float(np.median(rates)) if rates else None,
        "kdpipe": __version__,
        "git_commit": git_commit(),
    }


def table(summary: dict[str, Any]) -> str:
    """The summary people read at the end of a run, one row per fact."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} %"

    rows = [
        ("best val top-1", pct(summary["best_top1"])),
        ("last val top-1", pct(summary["last_top1"])),
        (
            "time per epoch",
            "-" if summary["seconds_per_epoch"] is None else f"{summary['seconds_per_epoch']:.1f} s",
        ),
        ("images per second", "-" if summary["images_per_s"] is None else f"{summary['images_per_s']:,.0f}"),
        ("processes", " -> ".join(str(w) for w in summary.get("world_sizes", [summary.get("world_size")]))),
        ("student ONNX", summary.get("onnx", "not exported (--no-export)")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
