"""The one Python face of kdpipe's native ops.

Target ops (``tap_targets``, ``dct_targets``, ``to_storage``): each has a NumPy implementation
(``*_numpy``) used when ``kdpipe._native`` is missing and as the float64 reference in tests. Shapes:
activations are (N, C, H, W) with ``channel_axis=1`` or (N, H, W, C) with ``channel_axis=3`` (or -1).
All returned targets are float32; ``token_targets`` takes transformer tokens (N, T, C).
Input ops (``normalize_u8``, ``crop_resize_u8``) are the native
passes behind ``kdpipe.data.preprocess.Normalize`` and ``kdpipe.data.transforms.crop_resize_batch``,
which keep their NumPy forms for builds without the module.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Literal

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
_CUDA_MAX_BATCH = 65535  # grid.y limit of the CUDA tap kernels


def native_available() -> bool:
    """True when the compiled CPU ops are importable."""
    return _native is not None


def cuda_available() -> bool:
    """True when the native module was built with its CUDA part (a GPU may still be absent)."""
    return _native is not None and bool(getattr(_native, "built_with_cuda", False))


def allowed_cpus() -> int:
    """CPUs this process may run on (a Slurm/cgroup/taskset binding), not the node's core count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS has no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def num_threads() -> int:
    """Threads for the native ops: ``KDPIPE_NUM_THREADS``, else torch's setting when torch is already
    imported, else ``allowed_cpus()``.

    torch is never imported here: that alone costs a second and a few hundred MiB, which a
    ``cache-teacher`` process (onnxruntime only) does not need.
    """
    env = os.environ.get("KDPIPE_NUM_THREADS")
    if env:
        return max(1, int(env))
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        return max(1, int(torch.get_num_threads()))
    return allowed_cpus()


def _check_activation(x: np.ndarray, channel_axis: int) -> int:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"tap_targets: expected a numpy array, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"tap_targets: expected a 4-D activation (N,C,H,W) or (N,H,W,C), got {x.shape}")
    if x.dtype not in (np.float32, np.float16, np.float64):
        raise ValueError(f"tap_targets: expected float16/float32/float64, got {x.dtype}")
    axis = channel_axis + 4 if channel_axis < 0 else channel_axis
    if axis not in (1, 3):
        raise ValueError(f"tap_targets: channel_axis must be 1 (NCHW) or 3/-1 (NHWC), got {channel_axis}")
    if x.shape[0] > 0 and 0 in x.shape[1:]:
        raise ValueError(f"tap_targets: channel and spatial sizes must be non-zero, got shape {x.shape}")
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


def _check_maps(maps: np.ndarray) -> None:
    if not isinstance(maps, np.ndarray):
        raise ValueError(f"dct_targets: expected a numpy array, got {type(maps).__name__}")
    if maps.ndim != 3:
        raise ValueError(f"dct_targets: expected maps of shape (N,H,W), got {maps.shape}")
    if maps.shape[1] == 0 or maps.shape[2] == 0:
        raise ValueError(f"dct_targets: spatial sizes must be non-zero, got shape {maps.shape}")


def dct_targets_numpy(maps: np.ndarray, variant: str = "dft-abs") -> np.ndarray:
    """Reference DCT-driven target (López-Cifuentes et al. 2022) of maps (N,H,W), float32 out.

    A0 = A - mean_hw(A); R = |Re FFT2(A0)| (``dft-abs``), Re FFT2(A0) (``dft``) or the orthonormal
    DCT-II of A0 (``dct2``); then per sample ``(R-min)/max`` (``dft-abs``) or ``(R-min)/(max-min)``.
    A denominator below 1e-12 gives an all-zero target (a constant map), never NaN.
    """
    if variant not in DCT_VARIANTS:
        raise ValueError(f"dct_targets: unknown variant {variant!r}; choose one of {', '.join(DCT_VARIANTS)}")
    _check_maps(maps)
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
    rounded = _bf16_bits(x32)
    bad = _bf16_overflow(rounded, x32)
    if bad.any():
        raise OverflowError(f"to_storage: {int(bad.sum())} value(s) exceed the bfloat16 range")
    return rounded


def _bf16_bits(x32: np.ndarray) -> np.ndarray:
    """bfloat16 bits of float32 values, round-to-nearest-even (NaN -> 0x7FC0)."""
    bits = x32.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    rounded[np.isnan(x32)] = 0x7FC0
    return rounded


def _bf16_overflow(rounded: np.ndarray, x32: np.ndarray) -> np.ndarray:
    exp_all_ones = (rounded & 0x7F80) == 0x7F80
    return exp_all_ones & ((rounded & 0x007F) == 0) & np.isfinite(x32)


def storage_overflow(x: np.ndarray, dtype: str) -> np.ndarray:
    """Boolean mask (shape of x) of the finite values that would become inf when stored as ``dtype``."""
    x32 = np.asarray(x, dtype=np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return np.isinf(x32.astype(np.float16)) & np.isfinite(x32)
    if dtype == "bfloat16":
        return _bf16_overflow(_bf16_bits(x32), x32)
    return np.zeros(x32.shape, dtype=bool)


def from_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Storage dtype -> float32 (bfloat16 given as uint16 bits)."""
    if dtype == "bfloat16":
        return (np.asarray(x, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(x, dtype=np.float32)


def tap_targets(x: np.ndarray, channel_axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Attention map (N,H,W) and pooled vector (N,C), float32, in one pass over x (float16/32).

    x: (N,C,H,W) with ``channel_axis=1`` or (N,H,W,C) with ``channel_axis=3``/-1; any strides
    (non-contiguous input is copied first). float64 input takes the NumPy path.
    """
    axis = _check_activation(x, channel_axis)
    if _native is None or x.dtype == np.float64:
        return tap_targets_numpy(x, channel_axis)
    at, pooled = _native.tap_targets(np.ascontiguousarray(x), axis, num_threads())
    return at, pooled


def token_targets(x: np.ndarray, start: int, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``tap_targets`` of transformer tokens x (N, T, C) ("NLC"): the patch tokens ``start ..
    start + h*w - 1`` laid out row-major on ``grid`` (h, w) are an NHWC map (N, h, w, C), so the NHWC
    kernel reduces them; the extra tokens are left out. Returns at (N, h, w) and pooled (N, C), float32.
    Only the patch tokens are copied, and only when extra tokens surround them."""
    if not isinstance(x, np.ndarray) or x.ndim != 3:
        raise ValueError(f"token_targets: expected tokens (N, T, C), got {getattr(x, 'shape', type(x))}")
    h, w = grid
    if start < 0 or h < 1 or w < 1 or start + h * w > x.shape[1]:
        raise ValueError(
            f"token_targets: patch tokens {start}..{start + h * w - 1} do not fit T = {x.shape[1]}"
        )
    patches = x[:, start : start + h * w, :].reshape(x.shape[0], h, w, x.shape[2])
    return tap_targets(patches, channel_axis=3)


def dct_targets(maps: np.ndarray, variant: str = "dft-abs") -> np.ndarray:
    """DCT-driven targets (N,H,W) float32 of maps (N,H,W); see ``dct_targets_numpy``.

    float32 maps take the native path; other dtypes the float64 NumPy reference.
    """
    if variant not in DCT_VARIANTS:
        raise ValueError(f"dct_targets: unknown variant {variant!r}; choose one of {', '.join(DCT_VARIANTS)}")
    _check_maps(maps)
    if _native is None or maps.dtype != np.float32:
        return dct_targets_numpy(maps, variant)
    out: np.ndarray = _native.dct_targets(np.ascontiguousarray(maps), variant, num_threads())
    return out


def to_storage(x: np.ndarray, dtype: str, threads: int | None = None) -> np.ndarray:
    """float32 -> storage dtype, raising OverflowError instead of writing inf.

    Same shape as x; float16 as np.float16, bfloat16 as its uint16 bits, float32 as a copy.
    Bit-identical to ``to_storage_numpy``. ``threads``: native threads (default ``num_threads()``;
    1 for a background thread that should not compete with the teacher's threads).
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"to_storage: unknown dtype {dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}")
    if _native is None or dtype == "float32":
        return to_storage_numpy(x, dtype)
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    nt = num_threads() if threads is None else max(1, int(threads))
    if dtype == "float16":
        out = np.empty(x32.shape, dtype=np.float16)
        overflow = _native.to_float16(x32, out, nt)
    else:
        out = np.empty(x32.shape, dtype=np.uint16)
        overflow = _native.to_bfloat16(x32, out, nt)
    if overflow:
        finite = np.abs(x32[np.isfinite(x32)])
        raise OverflowError(
            f"to_storage: {overflow} value(s) exceed the {dtype} range "
            f"(max |x| = {float(finite.max()):.4g}); store as float32"
            + (" or bfloat16" if dtype == "float16" else "")
        )
    return out


def normalize_u8(
    images: np.ndarray, lut: np.ndarray, src_channel: list[int], nchw: bool, out: np.ndarray, threads: int = 1
) -> None:
    """Fill ``out`` (float32, (B,C_out,H,W) when ``nchw`` else (B,H,W,C_out)) from uint8 images (B,H,W,C_in):
    ``out[.., c, ..] = lut[c, images[.., src_channel[c]]]``, with ``lut`` float32 (C_out, 256).

    The native gather behind ``kdpipe.data.preprocess.Normalize``; requires the native module.
    """
    if _native is None:  # pragma: no cover - callers check native_available()
        raise RuntimeError("normalize_u8 needs kdpipe._native")
    _native.normalize_u8(
        np.ascontiguousarray(images),
        np.ascontiguousarray(lut, dtype=np.float32),
        np.asarray(src_channel, dtype=np.int32),
        bool(nchw),
        out,
        max(1, int(threads)),
    )


def crop_resize_u8(
    images: np.ndarray,
    ya: np.ndarray,
    yb: np.ndarray,
    wy0: np.ndarray,
    wy1: np.ndarray,
    xa: np.ndarray,
    xb: np.ndarray,
    wx0: np.ndarray,
    wx1: np.ndarray,
    threads: int = 1,
) -> np.ndarray:
    """uint8 (B,H,W,C) -> (B,S,S,C): ``floor(v + 0.5)`` clipped, v = (a*wx0 + b*wx1)*wy0 + (c*wx0 + d*wx1)*wy1
    over source rows ya/yb and columns xa/xb (int64 (B,S)) with float32 weights (B,S), in float32 with
    one rounding per operation. The native blend behind ``kdpipe.data.transforms.crop_resize_batch``.
    """
    if _native is None:  # pragma: no cover - callers check native_available()
        raise RuntimeError("crop_resize_u8 needs kdpipe._native")
    out: np.ndarray = _native.crop_resize_u8(images, ya, yb, wy0, wy1, xa, xb, wx0, wx1, max(1, int(threads)))
    return out


# ---- CUDA: torch tensors already on the GPU, reduced there (no copy of activations to the host) ----


def cuda_device_count() -> int:
    """CUDA devices the native module sees; 0 without a CUDA build, a driver or a GPU."""
    return int(_native.cuda_device_count()) if _native is not None else 0


def _require_cuda_tensor(t: Any, op: str, dtypes: tuple[Any, ...]) -> Any:
    import torch

    if not cuda_available():
        raise RuntimeError(f"{op}: kdpipe._native was built without CUDA; rebuild with a CUDA toolkit")
    if not isinstance(t, torch.Tensor) or not t.is_cuda:
        raise ValueError(f"{op}: expected a torch CUDA tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: expected dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    return t.contiguous()


def tap_targets_cuda(x: Any, channel_axis: int = 1) -> tuple[Any, Any]:
    """CUDA ``tap_targets`` of a torch CUDA tensor x (N,C,H,W) or (N,H,W,C), float32/float16.

    Returns (at (N,H,W), pooled (N,C)) float32 torch tensors on x's device, enqueued on its current
    stream (no host synchronisation).
    """
    import torch

    x = _require_cuda_tensor(x, "tap_targets_cuda", (torch.float32, torch.float16))
    if x.dim() != 4:
        raise ValueError(f"tap_targets_cuda: expected a 4-D activation, got shape {tuple(x.shape)}")
    axis = channel_axis + 4 if channel_axis < 0 else channel_axis
    if axis not in (1, 3):
        raise ValueError(f"tap_targets_cuda: channel_axis must be 1 (NCHW) or 3/-1 (NHWC): {channel_axis}")
    n = x.shape[0]
    c, h, w = (x.shape[1], x.shape[2], x.shape[3]) if axis == 1 else (x.shape[3], x.shape[1], x.shape[2])
    if n > 0 and 0 in (c, h, w):
        raise ValueError(f"tap_targets_cuda: channel and spatial sizes must be non-zero: {tuple(x.shape)}")
    at = torch.empty((n, h, w), dtype=torch.float32, device=x.device)
    pooled = torch.empty((n, c), dtype=torch.float32, device=x.device)
    if n == 0:
        return at, pooled
    nbytes = _native.cuda_tap_workspace_bytes(min(n, _CUDA_MAX_BATCH), c, h * w, axis == 3)
    ws = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    for start in range(0, n, _CUDA_MAX_BATCH):  # grid.y limit; one launch for any realistic batch
        stop = min(n, start + _CUDA_MAX_BATCH)
        _native.cuda_tap_targets(
            x[start:stop].data_ptr(), stop - start, c, h, w, axis, x.dtype == torch.float16,
            at[start:stop].data_ptr(), pooled[start:stop].data_ptr(), ws.data_ptr(), x.device.index, stream,
        )  # fmt: skip
    return at, pooled


def dct_targets_cuda(maps: Any, variant: str = "dft-abs") -> Any:
    """CUDA ``dct_targets`` of a torch CUDA float32 tensor (N,H,W); returns (N,H,W) float32 on its device."""
    import torch

    if variant not in DCT_VARIANTS:
        raise ValueError(f"dct_targets: unknown variant {variant!r}; choose one of {', '.join(DCT_VARIANTS)}")
    maps = _require_cuda_tensor(maps, "dct_targets_cuda", (torch.float32,))
    if maps.dim() != 3 or maps.shape[1] == 0 or maps.shape[2] == 0:
        raise ValueError(f"dct_targets_cuda: expected maps of shape (N,H,W), got {tuple(maps.shape)}")
    n, h, w = maps.shape
    out = torch.empty((n, h, w), dtype=torch.float32, device=maps.device)
    if n == 0:
        return out
    ws = torch.empty(_native.cuda_dct_workspace_bytes(n, h, w), dtype=torch.uint8, device=maps.device)
    stream = torch.cuda.current_stream(maps.device).cuda_stream
    _native.cuda_dct_targets(
        maps.data_ptr(), n, h, w, variant, out.data_ptr(), ws.data_ptr(), maps.device.index, stream
    )
    return out
