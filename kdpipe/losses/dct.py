"""DCT-driven attention transfer (López-Cifuentes et al. 2022), differentiable student side.

The transform equals ``kdpipe.ops.dct_targets`` (which makes the cached teacher targets):
A0 = A - mean_hw(A); R = |Re FFT2(A0)| (``dft-abs``, the authors' released code), Re FFT2(A0)
(``dft``) or the orthonormal DCT-II of A0 (``dct2``); D = (R - min) / max (``dft-abs``) or
(R - min) / (max - min), per sample.

Guards (the released code has none): the DC coefficient is set to exactly 0 (it is sum(A0) = 0 in exact
arithmetic; in float32 it is rounding noise that would otherwise dominate a near-constant map), and a
denominator <= 1e-12 + 1e-9 * sum_hw|A| makes D all zeros (a constant map), with zero gradient, no NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kdpipe.errors import KdpipeError
from kdpipe.losses.common import as_float, channel_energy
from kdpipe.ops import DCT_VARIANTS

DCT_EPS = 1e-12
DCT_REL_EPS = 1e-9


def _dct2_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.to(dtype=dtype, device=device)


def dct_transform(maps: torch.Tensor, variant: str = "dft-abs") -> torch.Tensor:
    """(B,H,W) energy maps -> (B,H,W) normalised spectra (see module docstring). Differentiable."""
    if variant not in DCT_VARIANTS:
        raise KdpipeError(f"unknown DCT variant {variant!r}; choose one of {', '.join(DCT_VARIANTS)}")
    a = as_float(maps)
    b, h, w = a.shape
    a0 = a - a.mean(dim=(1, 2), keepdim=True)
    if variant == "dct2":
        mh = _dct2_matrix(h, a.dtype, a.device)
        mw = _dct2_matrix(w, a.dtype, a.device)
        r = mh @ a0 @ mw.T
    else:
        r = torch.fft.fft2(a0).real
        if variant == "dft-abs":
            r = r.abs()
    dc_mask = torch.ones(h, w, dtype=r.dtype, device=r.device)
    dc_mask[0, 0] = 0
    r = r * dc_mask
    flat = r.reshape(b, -1)
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    den = hi if variant == "dft-abs" else hi - lo
    tol = DCT_EPS + DCT_REL_EPS * a.abs().reshape(b, -1).sum(dim=1, keepdim=True).detach()
    ok = den.abs() > tol
    safe = torch.where(ok, den, torch.ones_like(den))
    out = torch.where(ok, (flat - lo) / safe, torch.zeros_like(flat))
    return out.reshape(b, h, w)


def dct_loss(
    student_feats: Sequence[torch.Tensor],
    teacher_targets: Sequence[torch.Tensor],
    variant: str = "dft-abs",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(1/B) sum_b m_b sum_i ||D_S,i[b] - D_T,i[b]||_2`` over tap pairs i.

    student_feats (B,C_i,H_i,W_i); teacher_targets cached D_T (B,h_i,w_i); mask (B,) bool/float or None
    (teacher-correct mask: 0 drops a sample but it still counts in B). The norm's gradient at 0 distance
    is 0 (torch's vector_norm backward masks norm == 0), never NaN.
    """
    per_sample = None
    for fs, dt in zip(student_feats, teacher_targets, strict=True):
        size = (int(dt.shape[-2]), int(dt.shape[-1]))
        ds = dct_transform(channel_energy(fs, size), variant)
        diff = (ds - dt.to(ds.dtype).detach()).reshape(ds.shape[0], -1)
        d = torch.linalg.vector_norm(diff, dim=1)
        per_sample = d if per_sample is None else per_sample + d
    assert per_sample is not None, "dct_loss needs at least one tap"
    if mask is not None:
        per_sample = per_sample * mask.to(per_sample.dtype)
    return per_sample.mean()
