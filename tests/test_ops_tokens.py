"""The native token op: ``ops.token_targets`` on (N, T, C) transformer tokens against float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize(("start", "extra_after"), [(0, 0), (1, 0), (3, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_native_token_targets_equal_a_float64_reference(start, extra_after, dtype):
    from kdpipe import ops

    rng = np.random.default_rng(start)
    h, w, c = 5, 7, 24
    x = rng.standard_normal((3, start + h * w + extra_after, c)).astype(dtype)
    at, pooled = ops.token_targets(x, start, (h, w))
    p = x.astype(np.float64)[:, start : start + h * w]
    a = (p**2).mean(axis=2)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    np.testing.assert_allclose(at, a.reshape(3, h, w), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pooled, p.mean(axis=1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        ops.token_targets(x, start + 1 + extra_after, (h, w))
