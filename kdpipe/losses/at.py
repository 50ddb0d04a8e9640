"""Activation-based attention transfer (Zagoruyko & Komodakis 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kdpipe.losses.common import channel_energy, l2n


def attention_map(feat: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``l2normalize(mean_c(F**2))`` of (B,C,H,W) -> (B,h*w) with the energy map area-pooled to ``size``."""
    a = channel_energy(feat, size)
    return l2n(a.reshape(a.shape[0], -1))


def at_loss(
    student_feats: Sequence[torch.Tensor],
    teacher_maps: Sequence[torch.Tensor],
    tap_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Sum over tap pairs of ``w_i * mean_{b,hw} (at_S - at_T)**2`` (``w_i`` = 1 unless given).

    student_feats: (B,C_i,H_i,W_i); teacher_maps: cached normalised maps (B,h_i,w_i) (used as given).
    The student's energy map is pooled to (h_i,w_i) before normalisation.
    """
    weights = list(tap_weights) if tap_weights is not None else [1.0] * len(teacher_maps)
    total = torch.zeros((), device=teacher_maps[0].device)
    for fs, vt, w in zip(student_feats, teacher_maps, weights, strict=True):
        size = (int(vt.shape[-2]), int(vt.shape[-1]))
        s = attention_map(fs, size)
        t = vt.reshape(vt.shape[0], -1).to(s.dtype).detach()
        total = total + w * (s - t).pow(2).mean()
    return total
