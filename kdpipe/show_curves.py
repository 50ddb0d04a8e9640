"""`kdpipe show-curves RUN...`: the training curves of distill runs in one figure, for reports.

Left: every loss term of each run per step (RUN/step_metrics.jsonl; runs without it fall back to the
epoch means of RUN/metrics.jsonl), log scale. Right: val top-1 (%) per epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError

_NOT_TERMS = {"step", "epoch", "epoch_step", "lr", "images_per_s", "data_wait_s", "total"}


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_curves(run: str) -> tuple[dict[str, tuple[list[float], list[float]]], tuple[list[int], list[float]]]:
    """(term -> (x in epochs, values), (epochs, val top-1)) of one run folder."""
    folder = Path(run)
    epochs = _records(folder / "metrics.jsonl")
    if not (folder / "metrics.jsonl").exists():
        raise KdpipeError(
            f"{run}: not a distill run folder (no metrics.jsonl); give the --out of kdpipe distill"
        )
    steps = _records(folder / "step_metrics.jsonl")
    terms: dict[str, tuple[list[float], list[float]]] = {}
    if steps:
        per_epoch = max(r["epoch_step"] for r in steps if r["epoch"] == steps[0]["epoch"]) + 1
        for r in steps:
            x = r["epoch"] - 1 + (r["epoch_step"] + 1) / max(per_epoch, 1)
            for k, v in r.items():
                if k not in _NOT_TERMS:
                    terms.setdefault(k, ([], []))[0].append(x)
                    terms[k][1].append(v)
    else:
        for r in epochs:
            for k, v in r.items():
                if k.startswith("train_") and k != "train_total":
                    terms.setdefault(k[len("train_") :], ([], []))[0].append(float(r["epoch"]))
                    terms[k[len("train_") :]][1].append(v)
    val = [(r["epoch"], r["val_top1"]) for r in epochs if "val_top1" in r]
    return terms, ([e for e, _ in val], [t for _, t in val])


def show_curves(runs: list[str], out: str) -> str:
    """Draw the curves of ``runs`` into the PNG ``out``; returns a one-line description."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        terms, (ep, top1) = load_curves(run)
        name = Path(run).name
        for j, (term, (x, y)) in enumerate(sorted(terms.items())):
            ax_loss.plot(x, y, styles[i % len(styles)], color=f"C{j}", label=f"{name}: {term}", lw=1)
        if ep:
            ax_top1.plot(ep, top1, styles[i % len(styles)], marker="o", ms=3, label=name)
    ax_loss.set(xlabel="epoch", ylabel="loss term (unweighted)", yscale="log", title="training losses")
    ax_top1.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation")
    for ax in (ax_loss, ax_top1):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return f"wrote {out}: {len(runs)} run(s)"
