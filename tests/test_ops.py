"""kdpipe.ops (native C++ path) against float64 formulas written out here, numpy.fft and scipy.fft."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
from hypothesis import given, settings
from hypothesis import strategies as st

from kdpipe import ops

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="kdpipe._native is not built")

SETTINGS = settings(max_examples=40, deadline=None)


# ---- independent float64 references --------------------------------------------------------------


def ref_tap(x: np.ndarray, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:
    x64 = x.astype(np.float64)  # float16 -> float64 is exact
    if channel_axis in (3, -1):
        x64 = x64.transpose(0, 3, 1, 2)
    a = (x64**2).sum(axis=1) / x64.shape[1]
    norm = np.sqrt((a**2).sum(axis=(1, 2), keepdims=True))
    return a / np.maximum(norm, 1e-12), x64.sum(axis=(2, 3)) / (x64.shape[2] * x64.shape[3])


def ref_dct(maps: np.ndarray, variant: str) -> np.ndarray:
    a0 = maps.astype(np.float64) - maps.astype(np.float64).mean(axis=(1, 2), keepdims=True)
    if variant == "dct2":
        r = scipy.fft.dctn(a0, type=2, norm="ortho", axes=(1, 2))
    else:
        r = np.fft.fft2(a0, axes=(1, 2)).real
        if variant == "dft-abs":
            r = np.abs(r)
    lo = r.min(axis=(1, 2), keepdims=True)
    hi = r.max(axis=(1, 2), keepdims=True)
    den = hi if variant == "dft-abs" else hi - lo
    return np.where(np.abs(den) > 1e-12, (r - lo) / np.where(np.abs(den) > 1e-12, den, 1.0), 0.0)


def ref_bfloat16(x: np.ndarray) -> np.ndarray:
    """Nearest bfloat16 by comparing the two float64 candidates; ties to the even one; NaN -> 0x7fc0."""
    bits = x.view(np.uint32)
    down = (bits >> 16).astype(np.uint32)
    up = down + 1
    as_f64 = lambda hi: (hi.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # noqa: E731
    with np.errstate(invalid="ignore", over="ignore"):
        d_down = np.abs(as_f64(down) - x.astype(np.float64))
        d_up = np.abs(as_f64(up) - x.astype(np.float64))
    pick_up = (d_up < d_down) | ((d_up == d_down) & (down % 2 == 1))
    out = np.where(pick_up, up, down).astype(np.uint16)
    out[np.isnan(x)] = 0x7FC0
    out[np.isinf(x)] = down[np.isinf(x)].astype(np.uint16)
    return out


def activation(seed: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.01, 10.0)
    return (rng.standard_normal(shape) * scale + rng.uniform(-1, 1) * scale).astype(dtype)


def check_tap(x: np.ndarray, channel_axis: int) -> None:
    at, pooled = ops.tap_targets(x, channel_axis)
    ref_at, ref_pooled = ref_tap(x, channel_axis)
    assert at.dtype == np.float32 and pooled.dtype == np.float32
    assert at.shape == ref_at.shape and pooled.shape == ref_pooled.shape
    np.testing.assert_allclose(at, ref_at, rtol=1e-5, atol=1e-6)
    scale = float(np.abs(x.astype(np.float64)).max()) or 1.0
    np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-5, atol=1e-6 * scale)


# ---- tap_targets ----------------------------------------------------------------------------------


@SETTINGS
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 70),
    h=st.integers(1, 13),
    w=st.integers(1, 13),
    nhwc=st.booleans(),
    half=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_tap_targets_matches_float64(
    n: int, c: int, h: int, w: int, nhwc: bool, half: bool, seed: int
) -> None:
    shape = (n, h, w, c) if nhwc else (n, c, h, w)
    check_tap(activation(seed, shape, np.float16 if half else np.float32), 3 if nhwc else 1)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 512, 7, 7),
        (1, 3, 56, 56),
        (2, 64, 32, 32),
        (33, 16, 8, 8),
        (1, 1, 1, 1),
        (3, 2048, 1, 1),
        (1, 1, 300, 200),
    ],
)
@pytest.mark.parametrize("channel_axis", [1, 3, -1])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_tap_targets_shapes(shape: tuple[int, int, int, int], channel_axis: int, dtype: type) -> None:
    check_tap(activation(sum(shape), shape, dtype), channel_axis)


def test_tap_targets_non_contiguous_same_numbers() -> None:
    base = activation(1, (4, 9, 10, 24), np.float32)
    views = [
        (base[:, :, :, ::2], 1),  # strided NCHW
        (base.transpose(0, 2, 3, 1), 3),  # NHWC view of NCHW memory
        (base.transpose(0, 2, 3, 1), 1),  # ... read as NCHW with C=10
        (base[::-1], 1),
    ]
    for view, axis in views:
        assert not view.flags.c_contiguous
        got = ops.tap_targets(view, axis)
        want = ops.tap_targets(np.ascontiguousarray(view), axis)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
        check_tap(view, axis)


def test_tap_targets_h_w_one_and_zeros() -> None:
    x = activation(2, (3, 5, 1, 1), np.float32)
    at, pooled = ops.tap_targets(x)
    np.testing.assert_allclose(at, 1.0, rtol=1e-6)
    np.testing.assert_allclose(pooled, x[:, :, 0, 0], rtol=1e-6)
    at, pooled = ops.tap_targets(np.zeros((2, 4, 3, 3), np.float32))
    assert np.all(at == 0) and np.all(pooled == 0)


def test_tap_targets_empty_batch() -> None:
    at, pooled = ops.tap_targets(np.zeros((0, 4, 3, 5), np.float32))
    assert at.shape == (0, 3, 5) and pooled.shape == (0, 4)


def test_tap_targets_native_agrees_with_numpy_fallback() -> None:
    for shape, axis in [((6, 40, 14, 14), 1), ((5, 14, 14, 40), 3)]:
        for dtype in (np.float32, np.float16):
            x = activation(3, shape, dtype)
            for got, ref in zip(ops.tap_targets(x, axis), ops.tap_targets_numpy(x, axis), strict=True):
                np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_tap_targets_float64_input() -> None:
    x = activation(4, (2, 3, 4, 5), np.float64)
    check_tap(x, 1)


def test_tap_targets_thread_count_does_not_change_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    for shape, axis in [((1, 300, 12, 12), 1), ((2, 12, 12, 300), 3)]:
        x = activation(5, shape, np.float32)
        results = []
        for threads in ("1", "2", "7"):
            monkeypatch.setenv("KDPIPE_NUM_THREADS", threads)
            results.append(ops.tap_targets(x, axis))
        for other in results[1:]:
            for g, w in zip(other, results[0], strict=True):
                np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(
    ("x", "axis", "match"),
    [
        (np.zeros((2, 3, 4), np.float32), 1, "4-D activation"),
        (np.zeros((2, 3, 4, 4), np.int32), 1, "float16/float32/float64"),
        (np.zeros((2, 3, 4, 4), np.float32), 2, "channel_axis must be 1"),
        (np.zeros((2, 0, 4, 4), np.float32), 1, "non-zero"),
        ([[[[1.0]]]], 1, "numpy array"),
    ],
)
def test_tap_targets_bad_input(x: np.ndarray, axis: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ops.tap_targets(x, axis)


# ---- dct_targets ----------------------------------------------------------------------------------


@SETTINGS
@given(
    n=st.integers(1, 4),
    h=st.integers(1, 20),
    w=st.integers(1, 20),
    variant=st.sampled_from(ops.DCT_VARIANTS),
    seed=st.integers(0, 2**31),
)
def test_dct_targets_matches_fft_and_scipy(n: int, h: int, w: int, variant: str, seed: int) -> None:
    maps = np.random.default_rng(seed).random((n, h, w)).astype(np.float32)
    got = ops.dct_targets(maps, variant)
    assert got.dtype == np.float32 and got.shape == maps.shape
    np.testing.assert_allclose(got, ref_dct(maps, variant), rtol=0, atol=2e-6)


@pytest.mark.parametrize("variant", ops.DCT_VARIANTS)
@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 56, 56), (1, 7, 13), (4, 1, 1), (2, 1, 9)])
def test_dct_targets_shapes_and_fallback(variant: str, shape: tuple[int, int, int]) -> None:
    maps, _ = ops.tap_targets(activation(6, (shape[0], 4, shape[1], shape[2]), np.float32))
    got = ops.dct_targets(maps, variant)
    np.testing.assert_allclose(got, ref_dct(maps, variant), rtol=0, atol=2e-6)
    np.testing.assert_allclose(got, ops.dct_targets_numpy(maps, variant), rtol=0, atol=2e-6)
    assert np.all((got >= 0) & (got <= 1))


@pytest.mark.parametrize("variant", ops.DCT_VARIANTS)
def test_dct_targets_constant_map_is_zero(variant: str) -> None:
    maps = np.stack([np.full((7, 9), v, np.float32) for v in (0.0, 0.1, 3.7e5)])
    got = ops.dct_targets(maps, variant)
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(got, 0.0)


def test_dct_targets_non_contiguous() -> None:
    maps = np.random.default_rng(7).random((3, 10, 12)).astype(np.float32)
    view = maps[:, ::2, ::-1]
    np.testing.assert_array_equal(ops.dct_targets(view, "dft"), ops.dct_targets(view.copy(), "dft"))
    np.testing.assert_allclose(ops.dct_targets(view, "dct2"), ref_dct(view, "dct2"), rtol=0, atol=2e-6)


def test_dct_targets_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        ops.dct_targets(np.zeros((1, 4, 4), np.float32), "dct3")
    with pytest.raises(ValueError, match=r"\(N,H,W\)"):
        ops.dct_targets(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="non-zero"):
        ops.dct_targets(np.zeros((2, 0, 4), np.float32))


# ---- to_storage -----------------------------------------------------------------------------------


def bit_patterns(seed: int, count: int) -> np.ndarray:
    """Random float32 bit patterns plus the awkward ones: ties, subnormals, NaN payloads, +-inf."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, size=count, dtype=np.uint64).astype(np.uint32)
    special = np.array(
        [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0xFF802001,
         0x33000000, 0x33000001, 0x38800000, 0x387FFFFF, 0x477FE000, 0x477FEFFF, 0x3F801000, 0x3F803000,
         0x3F808000, 0x3F818000, 0x00000001, 0x007FFFFF, 0x7F7F7FFF, 0x7F7F8000],
        dtype=np.uint32,
    )  # fmt: skip
    # float16 ties: a 1 followed by zeros in the 13 dropped bits, for many exponents
    ties = rng.integers(0x33000000, 0x47800000, size=count // 8, dtype=np.uint64).astype(np.uint32)
    ties = (ties & np.uint32(0xFFFFE000)) | np.uint32(0x1000)
    return np.concatenate([bits, special, ties]).view(np.float32)


def test_to_storage_float16_bit_exact() -> None:
    x = bit_patterns(8, 200_000)
    x = x[~(np.isfinite(x) & (np.abs(x) >= 65520))]  # those overflow (tested below)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    got = ops.to_storage(x, "float16")
    assert got.dtype == np.float16 and got.shape == x.shape
    np.testing.assert_array_equal(got.view(np.uint16), want)


def test_to_storage_bfloat16_bit_exact() -> None:
    x = bit_patterns(9, 200_000)
    x = x[~(np.isfinite(x) & (np.abs(x) >= 3.3961776e38))]  # those overflow (tested below)
    got = ops.to_storage(x, "bfloat16")
    assert got.dtype == np.uint16 and got.shape == x.shape
    np.testing.assert_array_equal(got, ref_bfloat16(x))
    np.testing.assert_array_equal(got, ops.to_storage_numpy(x, "bfloat16"))
    back = ops.from_storage(got, "bfloat16").astype(np.float64)
    with np.errstate(invalid="ignore"):  # signalling NaN payloads
        x64 = x.astype(np.float64)
    finite = np.isfinite(x)
    # half an ulp: 2^-8 relative for normals, 2^-134 absolute among subnormals
    assert np.all(np.abs(back[finite] - x64[finite]) <= np.abs(x64[finite]) * 2.0**-8 + 2.0**-134)


def test_to_storage_large_parallel_and_shape() -> None:
    x = np.random.default_rng(10).standard_normal((3, 1000, 70)).astype(np.float32)[:, ::2]
    for dtype in ("float16", "bfloat16", "float32"):
        got = ops.to_storage(x, dtype)
        assert got.shape == x.shape
        np.testing.assert_array_equal(got, ops.to_storage_numpy(x, dtype))
    assert ops.to_storage(x, "float32") is not x


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(65520.0, "float16"), (-1e6, "float16"), (3.4028235e38, "bfloat16"), (-3.3961776e38, "bfloat16")],
)
def test_to_storage_overflow_raises(value: float, dtype: str) -> None:
    x = np.array([[1.0, value, np.inf]], np.float32)
    with pytest.raises(OverflowError, match=f"1 value\\(s\\) exceed the {dtype} range"):
        ops.to_storage(x, dtype)
    with pytest.raises(OverflowError):
        ops.to_storage_numpy(x, dtype)


def test_to_storage_inf_and_largest_finite_pass() -> None:
    x = np.array([np.inf, -np.inf, np.nan, 65504.0, 65519.99], np.float32)
    np.testing.assert_array_equal(
        ops.to_storage(x, "float16").view(np.uint16), [0x7C00, 0xFC00, 0x7E00, 0x7BFF, 0x7BFF]
    )


def test_to_storage_bad_dtype() -> None:
    with pytest.raises(ValueError, match="unknown dtype"):
        ops.to_storage(np.zeros(3, np.float32), "int8")


def test_module_helpers() -> None:
    from kdpipe import _native  # type: ignore[attr-defined]

    assert _native.openmp_max_threads() >= 1
    assert _native.cuda_device_count() >= 0
    assert ops.num_threads() >= 1
