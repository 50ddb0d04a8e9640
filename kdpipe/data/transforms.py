"""Deterministic image operations on uint8 HWC arrays: pad, crop + bilinear resize, horizontal flip.

Bilinear resize (own implementation, so cached and replayed views are bit-identical everywhere):
- half-pixel centres: output pixel i of an axis of length ``size`` samples source coordinate
  ``s = (i + 0.5) * (length / size) - 0.5`` inside the crop box, clamped below at 0; neighbours
  ``floor(s)`` and ``floor(s) + 1`` are clamped to the box (edge replication), as in PIL / OpenCV /
  ``torch.nn.functional.interpolate(..., align_corners=False)`` without antialiasing;
- all arithmetic in float32, one rounding per NumPy operation (no fused multiply-add), horizontal
  interpolation first, then vertical;
- result rounded half up (``floor(v + 0.5)``) and clipped to 0..255.
No antialiasing filter is applied when shrinking (unlike PIL's resize): the crop-then-resize views are
defined by this formula alone. A crop whose box equals the output size is an exact pixel copy.
"""

from __future__ import annotations

import numpy as np

from kdpipe import ops
from kdpipe.errors import KdpipeError

PAD_MODES = ("reflect", "constant")


def pad_images(images: np.ndarray, pad: int, mode: str) -> np.ndarray:
    """Pad (B,H,W,C) uint8 by ``pad`` pixels on each spatial side.

    mode "reflect": mirror without repeating the edge (NumPy/torch "reflect"; needs pad < H and pad < W);
    mode "constant": zeros.
    """
    if pad == 0:
        return images
    if mode not in PAD_MODES:
        raise KdpipeError(f"unknown pad mode {mode!r}; use one of {PAD_MODES}")
    if mode == "reflect" and (pad >= images.shape[1] or pad >= images.shape[2]):
        raise KdpipeError(
            f"reflect padding of {pad} px needs images larger than {pad} px, got {images.shape[1:3]}; "
            "use pad_mode 'constant' or a smaller pad"
        )
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    if mode == "reflect":
        return np.pad(images, widths, mode="reflect")
    return np.pad(images, widths, mode="constant", constant_values=0)


def _axis_coords(
    start: np.ndarray, length: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (B,size) int64 of both neighbours and the float32 weight of the second one."""
    scale = length.astype(np.float32) / np.float32(size)
    centres = np.arange(size, dtype=np.float32) + np.float32(0.5)
    s = centres[None, :] * scale[:, None] - np.float32(0.5)
    s = np.maximum(s, np.float32(0.0))
    i0 = np.floor(s).astype(np.int64)
    last = (length.astype(np.int64) - 1)[:, None]
    i0 = np.minimum(i0, last)
    i1 = np.minimum(i0 + 1, last)
    frac = s - i0.astype(np.float32)
    base = start.astype(np.int64)[:, None]
    return base + i0, base + i1, frac


def crop_resize_batch(
    images: np.ndarray,
    y0: np.ndarray,
    x0: np.ndarray,
    h: np.ndarray,
    w: np.ndarray,
    flip: np.ndarray,
    size: int,
    native: bool = True,
) -> np.ndarray:
    """Crop box (y0, x0, h, w) of each image of (B,H,W,C) uint8, resize it to (size, size), flip.

    y0, x0, h, w, flip: (B,) integers; the boxes must lie inside the images. flip != 0 mirrors the
    output horizontally. Returns (B,size,size,C) uint8. Resizes run in kdpipe's native op when it is
    built (one thread), else (or with ``native=False``) as one set of NumPy gathers for the batch.
    """
    B = images.shape[0]
    y0, x0, h, w = (np.asarray(a, dtype=np.int64) for a in (y0, x0, h, w))
    flip = np.asarray(flip).astype(bool)
    if B == 0:
        return np.zeros((0, size, size, images.shape[3]), np.uint8)
    H, W = images.shape[1:3]
    if (
        (y0 < 0).any()
        or (x0 < 0).any()
        or (h < 1).any()
        or (w < 1).any()
        or (y0 + h > H).any()
        or (x0 + w > W).any()
    ):
        raise KdpipeError(f"view crop box outside the image of size {(H, W)}: check the view parameters")
    bidx = np.arange(B)[:, None, None]
    if (h == size).all() and (w == size).all():
        # pure crops: pick one (size, size) window per image from a strided view (one block copy
        # per image instead of a per-pixel gather), then mirror the flipped ones in place
        win = np.lib.stride_tricks.sliding_window_view(images, (size, size), axis=(1, 2))
        out = np.ascontiguousarray(win[np.arange(B), y0, x0].transpose(0, 2, 3, 1))
        if flip.any():
            out[flip] = out[flip][:, :, ::-1]
        return out
    ya, yb, fy = _axis_coords(y0, h, size)
    xa, xb, fx = _axis_coords(x0, w, size)
    xa = np.where(flip[:, None], xa[:, ::-1], xa)
    xb = np.where(flip[:, None], xb[:, ::-1], xb)
    fx = np.where(flip[:, None], fx[:, ::-1], fx)
    one = np.float32(1.0)
    if native and ops.native_available():  # the same blend in one pass, bit-identical (tests)
        ya0, yb0, wy0, wy1, xa0, xb0, wx0, wx1 = (
            np.ascontiguousarray(a) for a in (ya, yb, one - fy, fy, xa, xb, one - fx, fx)
        )
        return ops.crop_resize_u8(np.ascontiguousarray(images), ya0, yb0, wy0, wy1, xa0, xb0, wx0, wx1)
    wx1 = fx[:, None, :, None]
    wx0 = one - wx1
    wy1 = fy[:, :, None, None]
    wy0 = one - wy1

    def gather(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        return images[bidx, r[:, :, None], c[:, None, :]].astype(np.float32)

    top = gather(ya, xa) * wx0 + gather(ya, xb) * wx1
    bottom = gather(yb, xa) * wx0 + gather(yb, xb) * wx1
    v = top * wy0 + bottom * wy1
    v = np.floor(v + np.float32(0.5))
    return np.clip(v, 0, 255).astype(np.uint8)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one (H,W,C) uint8 image to (height, width) with the same formula as above."""
    H, W = image.shape[:2]
    ya, yb, fy = _axis_coords(np.zeros(1, np.int64), np.array([H]), height)
    xa, xb, fx = _axis_coords(np.zeros(1, np.int64), np.array([W]), width)
    ya, yb, fy, xa, xb, fx = ya[0], yb[0], fy[0], xa[0], xb[0], fx[0]
    img = image.astype(np.float32)
    one = np.float32(1.0)
    wx1 = fx[None, :, None]
    wy1 = fy[:, None, None]
    top = img[ya][:, xa] * (one - wx1) + img[ya][:, xb] * wx1
    bottom = img[yb][:, xa] * (one - wx1) + img[yb][:, xb] * wx1
    v = np.floor(top * (one - wy1) + bottom * wy1 + np.float32(0.5))
    return np.clip(v, 0, 255).astype(np.uint8)
