"""Normalize: NumPy vs torch bit-identity and a float64 reference."""

import numpy as np
import pytest
import torch

from kdpipe.data.preprocess import Normalize
from kdpipe.errors import KdpipeError

CONFIGS = [
    dict(
        scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channels=3, channel_order="rgb"
    ),
    dict(
        scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channels=3, channel_order="bgr"
    ),
    dict(
        scale=1.0, mean=(103.94, 116.78, 123.68), std=(1.0,), channels=3, channel_order="bgr", layout="NHWC"
    ),
    dict(scale=1 / 255, mean=(0.1307,), std=(0.3081,), channels=1),
    dict(scale=1 / 127.5, mean=(1.0,), std=(1.0,), channels=3),
]


def _reference(x: np.ndarray, cfg: dict) -> np.ndarray:
    """float64 formula, written independently."""
    x = x.astype(np.float64)
    c = cfg["channels"]
    if x.shape[3] == 1 and c == 3:
        x = np.concatenate([x, x, x], axis=3)
    elif x.shape[3] == 3 and c == 1:
        x = x.mean(axis=3, keepdims=True)
    elif cfg.get("channel_order") == "bgr":
        x = x[..., [2, 1, 0]]
    mean = np.array(cfg["mean"], np.float64)
    std = np.array(cfg["std"], np.float64)
    y = (x * cfg["scale"] - mean) / std
    return y if cfg.get("layout") == "NHWC" else y.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("c_in", [1, 3])
def test_numpy_torch_identical_and_close_to_reference(cfg, c_in):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 7, 5, c_in), dtype=np.uint8)
    x[0, 0, 0] = 0
    x[0, 0, 1] = 255
    norm = Normalize(**cfg)
    a = norm(x)
    b = norm.normalize_torch(torch.from_numpy(x)).numpy()
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert a.tobytes() == b.tobytes()
    ref = _reference(x, cfg)
    assert a.shape == ref.shape
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5)


def test_dict_roundtrip_and_errors():
    n = Normalize(**CONFIGS[1])
    assert Normalize.from_dict(n.to_dict()) == n
    with pytest.raises(KdpipeError):
        Normalize(mean=(0.5, 0.5), std=(1.0,), channels=3)
    with pytest.raises(KdpipeError):
        Normalize(channel_order="rbg")
    with pytest.raises(KdpipeError):
        Normalize(std=(0.0,))
    with pytest.raises(KdpipeError):
        Normalize.from_dict({"scale": 1.0, "bogus": 1})
    with pytest.raises(KdpipeError):
        n(np.zeros((2, 4, 4, 3), np.float32))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[2], CONFIGS[3]])
def test_threads_and_strided_input_identical_to_torch(cfg, threads):
    """The native gather (several threads, a non-contiguous crop as input) gives torch's bits."""
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (9, 40, 36, 3), dtype=np.uint8)
    x = big[1::2, 3:35, 2:34]  # strided view (4, 32, 32, 3)
    norm = Normalize(**cfg)
    a = norm(x, threads=threads)
    b = norm.normalize_torch(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    assert a.tobytes() == b.tobytes()


def test_out_buffer_is_filled_and_checked():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    norm = Normalize(**CONFIGS[0])
    out = np.full((4, 3, 6, 5), np.nan, np.float32)
    assert norm(x, out=out) is out
    assert out.tobytes() == norm(x).tobytes()
    with pytest.raises(ValueError, match="out must be"):
        norm(x, out=np.empty((4, 6, 5, 3), np.float32))  # NHWC shape for an NCHW normalisation
