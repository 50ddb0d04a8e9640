"""The one Python face of kdpipe's native target ops.

Every op has a NumPy implementation (``*_numpy``) used when ``kdpipe._native`` is missing and as the
float64 reference in tests. Shapes: activations are (N, C, H, W) with ``channel_axis=1`` or
(N, H, W, C) with ``channel_axis=3`` (or -1). All returned targets are float32.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np

try:  # the native module is optional: a source checkout without a build still works (slower)
    from kdpipe import _native  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised only on broken installs
    _native = None

DctVariant = Literal["dft-abs", "dft", "dct2"]
DCT_VARIANTS: tuple[str, ...] = ("dft-abs", "dft", "dct2")
STORAGE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
AT_EPS = 1e-12
DCT_EPS = 1e-12


def native_available() -> bool:
    """True when the compiled CPU ops are importable."""
    return _native is not None


def cuda_available() -> bool:
    """True when the native module was built with its CUDA part (a GPU may still be absent)."""
    return _native is not None and bool(getattr(_native, "built_with_cuda", False))


def num_threads() -> int:
    """Threads for the native ops: ``KDPIPE_NUM_THREADS``, else torch's setting, else all cores."""
    env = os.environ.get("KDPIPE_NUM_THREADS")
    if env:
        return max(1, int(env))
    try:
        import torch

        return max(1, torch.get_num_threads())
    except ImportError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


def _check_activation(x: np.ndarray, channel_axis: int) -> int:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"tap_targets: expected a numpy array, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"tap_targets: expected a 4-D activation (N,C,H,W) or (N,H,W,C), got shape {x.shape}")
    if x.dtype not in (np.float32, np.float16, np.float64):
        raise ValueError(f"tap_targets: expected float16/float32/float64, got {x.dtype}")
    axis = channel_axis + 4 if channel_axis < 0 else channel_axis
    if axis not in (1, 3):
        raise ValueError(f"tap_targets: channel_axis must be 1 (NCHW) or 3/-1 (NHWC), got {channel_axis}")
    return axis


def tap_targets_numpy(x: np.ndarray, channel_axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Reference: attention map ``l2normalize(mean_c(x**2))`` (N,H,W) and pooled ``mean_hw(x)`` (N,C).

    Computed in float64, returned as float32. eps 1e-12 on the norm (Zagoruyko & Komodakis).
    """
    axis = _check_activation(x, channel_axis)
    xd = np.asarray(x, dtype=np.float64)
    if axis == 3:
        xd = np.moveaxis(xd, 3, 1)
    n = xd.shape[0]
    a = np.mean(xd * xd, axis=1)
    flat = a.reshape(n, -1)
    norm = np.sqrt(np.sum(flat * flat, axis=1, keepdims=True))
    at = (flat / np.maximum(norm, AT_EPS)).reshape(a.shape)
    pooled = xd.mean(axis=(2, 3))
    return at.astype(np.float32), pooled.astype(np.float32)


def _dct2_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix M (n, n): y = M @ x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def dct_targets_numpy(maps: np.ndarray, variant: str = "dft-abs") -> np.ndarray:
    """Reference DCT-driven target (López-Cifuentes et al. 2022) of maps (N,H,W), float32 out.

    A0 = A - mean_hw(A); R = |Re FFT2(A0)| (``dft-abs``), Re FFT2(A0) (``dft``) or the orthonormal
    DCT-II of A0 (``dct2``); then per sample ``(R-min)/max`` (``dft-abs``) or ``(R-min)/(max-min)``.
    A denominator below 1e-12 gives an all-zero target (a constant map), never NaN.
    """
    if variant not in DCT_VARIANTS:
        raise ValueError(f"dct_targets: unknown variant {variant!r}; choose one of {', '.join(DCT_VARIANTS)}")
    if maps.ndim != 3:
        raise ValueError(f"dct_targets: expected maps of shape (N,H,W), got {maps.shape}")
    a = np.asarray(maps, dtype=np.float64)
    a0 = a - a.mean(axis=(1, 2), keepdims=True)
    if variant == "dct2":
        mh, mw = _dct2_matrix(a.shape[1]), _dct2_matrix(a.shape[2])
        r = np.einsum("ij,njk,lk->nil", mh, a0, mw)
    else:
        r = np.fft.fft2(a0).real
        if variant == "dft-abs":
            r = np.abs(r)
    lo = r.min(axis=(1, 2), keepdims=True)
    hi = r.max(axis=(1, 2), keepdims=True)
    den = hi if variant == "dft-abs" else hi - lo
    safe = np.where(np.abs(den) > DCT_EPS, den, 1.0)
    out = np.where(np.abs(den) > DCT_EPS, (r - lo) / safe, 0.0)
    return out.astype(np.float32)


def to_storage_numpy(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> storage dtype. bfloat16 is returned as its raw uint16 bits (NumPy has no bf16).

    Raises OverflowError when a finite value would become inf.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"to_storage: unknown dtype {dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}")
    x32 = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x32.copy()
    if dtype == "float16":
        with np.errstate(over="ignore"):
            out = x32.astype(np.float16)
        bad = np.isinf(out) & np.isfinite(x32)
        if bad.any():
            raise OverflowError(
                f"to_storage: {int(bad.sum())} value(s) exceed the float16 range (max |x| = "
                f"{float(np.abs(x32[np.isfinite(x32)]).max()):.4g}); store as float32 or bfloat16"
            )
        return out
    bits = x32.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round-to-nearest-even
    nan = np.isnan(x32)
    rounded[nan] = 0x7FC0
    exp_all_ones = (rounded & 0x7F80) == 0x7F80
    bad = exp_all_ones & ((rounded & 0x007F) == 0) & np.isfinite(x32)
    if bad.any():
        raise OverflowError(f"to_storage: {int(bad.sum())} value(s) exceed the bfloat16 range")
    return rounded


def from_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Storage dtype -> float32 (bfloat16 given as uint16 bits)."""
    if dtype == "bfloat16":
        return (np.asarray(x, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(x, dtype=np.float32)


def tap_targets(x: np.ndarray, channel_axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Attention map (N,H,W) and pooled vector (N,C), float32, in one pass over x (float16/32)."""
    _check_activation(x, channel_axis)
    return tap_targets_numpy(x, channel_axis)


def dct_targets(maps: np.ndarray, variant: str = "dft-abs") -> np.ndarray:
    """DCT-driven targets (N,H,W) float32 of maps (N,H,W); see ``dct_targets_numpy``."""
    return dct_targets_numpy(maps, variant)


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> storage dtype, raising OverflowError instead of writing inf."""
    return to_storage_numpy(x, dtype)
