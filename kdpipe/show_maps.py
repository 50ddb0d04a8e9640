"""`kdpipe show-maps`: a figure of the teacher's cached attention maps next to students' maps.

Rows: the input view, the teacher's cached maps (one column per tap), then each student run's maps on
the same view (e.g. a plain student "before" and a distilled one "after"), pooled to the teacher's size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.errors import KdpipeError


def load_student_run(run: str) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Rebuild a trained student from a run folder (config.json + checkpoints/last.pt), eval mode."""
    from kdpipe.student import StudentTaps, create_model

    folder = Path(run)
    cfg_path, ckpt = folder / "config.json", folder / "checkpoints" / "last.pt"
    if not cfg_path.exists() or not ckpt.exists():
        raise KdpipeError(
            f"{run} is not a finished kdpipe distill run (needs config.json and checkpoints/last.pt)"
        )
    cfg = json.loads(cfg_path.read_text())
    model = create_model(
        cfg["student"],
        num_classes=cfg["num_classes"],
        in_chans=cfg["in_chans"],
        **cfg.get("student_kwargs", {}),
    )
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["module"]
    model.load_state_dict({k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")})
    model.eval()
    names = cfg.get("paired_student_taps") or cfg.get("student_taps", "auto")  # the taps the run trained
    return model, StudentTaps(model, names), cfg


def student_maps(model: torch.nn.Module, taps: Any, x: torch.Tensor, sizes: list[tuple[int, int]]) -> list:
    """L2-normalised maps mean_c(F**2) of each student tap, area-pooled to the teacher sizes: (H,W) arrays."""
    with torch.no_grad():
        model(x)
    out = []
    for f, (h, w) in zip(taps.features, sizes, strict=False):
        a = f.float().pow(2).mean(1, keepdim=True)
        a = F.adaptive_avg_pool2d(a, (h, w))[:, 0]
        a = a / a.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
        out.append(a[0].numpy())
    return out


def show_maps(
    cache_path: str, sample: int, runs: list[str], out: str, view: int = 0, data: str | None = None
) -> str:
    """Write the figure to ``out`` (PNG) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdpipe import cache as cache_mod
    from kdpipe.data import load_dataset
    from kdpipe.data.preprocess import Normalize
    from kdpipe.data.views import ViewPolicy, apply_views
    from kdpipe.pairing import pair_indices

    cache = cache_mod.open(cache_path)
    if not 0 <= sample < len(cache):
        raise KdpipeError(f"--sample {sample}: the cache holds samples 0..{len(cache) - 1}")
    if not 0 <= view < cache.num_views:
        raise KdpipeError(f"--view {view}: the cache holds views 0..{cache.num_views - 1}")
    ds = load_dataset(data or cache.manifest["dataset"]["spec"])
    policy = ViewPolicy.from_dict(cache.manifest["views"]["policy"])
    params = np.asarray(cache.view_params[sample, view], dtype=np.int32)[None]
    u8 = apply_views(ds.load(np.array([sample])), params, policy)
    taps = cache.taps
    one = (np.array([sample]), np.array([view]))
    teacher = [cache.gather(f"at.{i}", *one)[0] for i in range(len(taps))]
    sizes = [t.shape for t in teacher]
    rows: list[tuple[str, list[np.ndarray | None]]] = [("teacher at (cache)", list(teacher))]
    if "attn.0" in cache.manifest["arrays"]:  # a transformer's own class-token attention
        rows.append(("teacher attn (cache)", [cache.gather(f"attn.{i}", *one)[0] for i in range(len(taps))]))
    norm = Normalize.from_dict(cache.manifest["teacher"]["spec"]["normalize"])
    for run in runs:
        model, staps, cfg = load_student_run(run)
        x = torch.from_numpy(np.ascontiguousarray(norm(u8)))
        # each student map under the teacher tap it was paired with (a ViT teacher has more taps)
        paired = cfg.get("paired_teacher_taps") or pair_indices(len(staps.names), len(taps))[1]
        maps = student_maps(model, staps, x, [sizes[t] for t in paired])
        row: list[np.ndarray | None] = [None] * len(taps)
        for t, m in zip(paired, maps, strict=True):
            row[t] = m
        rows.append((f"{cfg['student']} {cfg['method']}", row))
    ncol = len(taps) + 1
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.2 * ncol, 2.2 * len(rows)), squeeze=False)
    label = ds.class_names[int(ds.labels[sample])] if ds.class_names else str(int(ds.labels[sample]))
    for r, (name, maps) in enumerate(rows):
        ax = axes[r][0]
        ax.imshow(u8[0].squeeze(-1) if u8.shape[-1] == 1 else u8[0], cmap="gray")
        ax.set_title(f"sample {sample} ({label})" if r == 0 else "", fontsize=8)
        ax.set_ylabel(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        for c, m in enumerate(maps):
            ax = axes[r][c + 1]
            if m is not None:
                ax.imshow(m, cmap="inferno")
            else:
                ax.set_axis_off()  # a teacher tap this student was not paired with
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and m is not None:
                ax.set_title(f"tap {c} {m.shape[0]}x{m.shape[1]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
