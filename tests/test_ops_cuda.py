"""CUDA target ops against float64 formulas (needs a GPU), and their clean failure without one."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kdpipe import ops

torch = pytest.importorskip("torch")

HAVE_GPU = ops.cuda_available() and torch.cuda.is_available() and ops.cuda_device_count() > 0
needs_gpu = pytest.mark.skipif(
    not HAVE_GPU,
    reason="needs a CUDA GPU and kdpipe._native built with CUDA "
    f"(built with CUDA: {ops.cuda_available()}, torch sees a GPU: {torch.cuda.is_available()})",
)
no_gpu = pytest.mark.skipif(HAVE_GPU, reason="checks the behaviour on a machine without a GPU")


def ref_tap(x: np.ndarray, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:
    x64 = x.astype(np.float64)
    if channel_axis == 3:
        x64 = x64.transpose(0, 3, 1, 2)
    a = (x64**2).mean(axis=1)
    norm = np.sqrt((a**2).sum(axis=(1, 2), keepdims=True))
    return a / np.maximum(norm, 1e-12), x64.mean(axis=(2, 3))


def ref_dct(maps: np.ndarray, variant: str) -> np.ndarray:
    import scipy.fft

    a0 = maps.astype(np.float64) - maps.astype(np.float64).mean(axis=(1, 2), keepdims=True)
    if variant == "dct2":
        r = scipy.fft.dctn(a0, type=2, norm="ortho", axes=(1, 2))
    else:
        r = np.fft.fft2(a0, axes=(1, 2)).real
        r = np.abs(r) if variant == "dft-abs" else r
    lo, hi = r.min(axis=(1, 2), keepdims=True), r.max(axis=(1, 2), keepdims=True)
    den = hi if variant == "dft-abs" else hi - lo
    return np.where(np.abs(den) > 1e-12, (r - lo) / np.where(np.abs(den) > 1e-12, den, 1.0), 0.0)


TAP_SHAPES = [(4, 64, 32, 32), (1, 300, 7, 7), (3, 5, 56, 56), (2, 1, 1, 1), (70, 3, 9, 300)]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", TAP_SHAPES)
@pytest.mark.parametrize("channel_axis", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tap_targets_cuda(shape: tuple[int, int, int, int], channel_axis: int, dtype: str) -> None:
    x = (np.random.default_rng(sum(shape)).standard_normal(shape) + 0.2).astype(dtype)
    at, pooled = ops.tap_targets_cuda(torch.from_numpy(x).cuda(), channel_axis)
    ref_at, ref_pooled = ref_tap(x, channel_axis)
    np.testing.assert_allclose(at.cpu().numpy(), ref_at, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled.cpu().numpy(), ref_pooled, rtol=1e-5, atol=1e-5)


@needs_gpu
@pytest.mark.gpu
def test_tap_targets_cuda_non_contiguous_and_stream() -> None:
    x = torch.randn(3, 8, 10, 12, device="cuda").transpose(1, 3)  # (3, 12, 10, 8) non-contiguous
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        at, pooled = ops.tap_targets_cuda(x, 1)
    stream.synchronize()
    ref_at, ref_pooled = ref_tap(x.cpu().numpy(), 1)
    np.testing.assert_allclose(at.cpu().numpy(), ref_at, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled.cpu().numpy(), ref_pooled, rtol=1e-5, atol=1e-5)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("variant", ops.DCT_VARIANTS)
@pytest.mark.parametrize("shape", [(5, 8, 8), (2, 56, 56), (3, 7, 13), (2, 1, 1)])
def test_dct_targets_cuda(variant: str, shape: tuple[int, int, int]) -> None:
    maps = np.random.default_rng(1).random(shape).astype(np.float32)
    maps[0] = 0.25  # a constant map gives zeros
    got = ops.dct_targets_cuda(torch.from_numpy(maps).cuda(), variant).cpu().numpy()
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, ref_dct(maps, variant), rtol=0, atol=2e-6)
    np.testing.assert_allclose(got, ops.dct_targets(maps, variant), rtol=0, atol=2e-6)


@no_gpu
def test_cuda_entry_points_raise_without_gpu() -> None:
    from kdpipe import _native  # type: ignore[attr-defined]

    assert _native.cuda_device_count() == 0
    with pytest.raises(RuntimeError, match="CUDA"):
        _native.cuda_tap_targets(0, 1, 1, 1, 1, 1, False, 0, 0, 0, 0, 0)
    with pytest.raises(RuntimeError, match="CUDA"):
        _native.cuda_dct_targets(0, 1, 2, 2, "dft", 0, 0, 0, 0)


def test_native_imports_without_cuda_driver() -> None:
    code = "import kdpipe._native as n; print(n.cuda_device_count(), n.openmp_max_threads() > 0)"
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "True"]
