"""Shared pieces of the feature losses: student attention maps pooled to a teacher's resolution."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

AT_EPS = 1e-12


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 -> float32 (AMP safety); float32 and float64 pass through unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _MeanSquareOverChannels(torch.autograd.Function):
    """``mean_c(F**2)`` with a one-pass backward ``F * (2/C) * grad``; autograd's own backward of
    ``(f * f).mean(1)`` makes two full-size products and adds them (about twice the time on CPU)."""

    @staticmethod
    def forward(ctx: Any, f: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(f)
        return (f * f).mean(dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (f,) = ctx.saved_tensors
        return f * (grad * (2.0 / f.shape[1])).unsqueeze(1)


def channel_energy(feat: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``mean_c(F**2)`` of (B,C,H,W) -> (B,H,W), area-pooled (adaptive average) to ``size`` if it differs."""
    a = _MeanSquareOverChannels.apply(as_float(feat))
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.adaptive_avg_pool2d(a.unsqueeze(1), size).squeeze(1)
    return a


def l2n(flat: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation of (B,N) with the norm clamped at 1e-12 (F.normalize semantics)."""
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(AT_EPS)
