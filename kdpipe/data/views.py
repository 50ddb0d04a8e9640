"""Replayable augmented views: parameters drawn from (seed, sample, view), applied bit-identically.

A view is described by five int32 numbers ``VIEW_FIELDS = (y0, x0, h, w, flip)``: a crop box and a
horizontal flip. The box is in the coordinates of the image the crop is taken from:
- kind "none" and "rrc": the source image itself (H, W);
- kind "pad-crop": the *padded* image (H + 2*pad, W + 2*pad); the source pixel (r, c) is at
  (r + pad, c + pad) there.
The cropped box is resized to ``size x size`` (bilinear, :mod:`kdpipe.data.transforms`) when its shape
differs, then mirrored when flip is 1.

The plain view (view index -1, or policy kind "none") is the whole image, no flip: (0, 0, H, W, 0),
or (pad, pad, H, W, 0) for "pad-crop"; it is resized to ``size x size`` when the image is not already.

Random numbers come from a counter-based hash, not a stateful generator: every number is
``splitmix64``-mixed from (seed, sample, view, draw index) in NumPy uint64 arithmetic, and all later
arithmetic uses IEEE operations that are correctly rounded (+, -, *, /, sqrt, floor, rint) plus an own
exp; hence the same parameters for a (seed, sample, view) on any machine, in any process, in any batch
grouping. Draw indices: 0-9 area fraction of the rrc tries, 10-19 log aspect ratio, 20/21 crop
position (y, x), 22 flip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdpipe.data.transforms import PAD_MODES, crop_resize_batch, pad_images
from kdpipe.errors import KdpipeError

VIEW_FIELDS = ("y0", "x0", "h", "w", "flip")
KINDS = ("none", "pad-crop", "rrc")

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_RRC_TRIES = 10
_DRAW_AREA = 0
_DRAW_RATIO = 10
_DRAW_Y = 20
_DRAW_X = 21
_DRAW_FLIP = 22
_LN2 = 0.6931471805599453  # float64 nearest to ln 2


@dataclass(frozen=True)
class ViewPolicy:
    """How augmented views are made.

    kind: "none" (plain views only), "pad-crop" (CIFAR style: pad ``pad`` px with ``pad_mode``, random
        ``size x size`` crop, flip) or "rrc" (random-resized-crop: area fraction in ``scale``,
        log-uniform aspect ratio w/h in ``ratio``, 10 tries then a centre-crop fallback, resized to
        ``size x size``, flip).
    size: output side in pixels.
    flip: random horizontal flip with probability 1/2 (augmented views only).
    """

    kind: str = "none"
    size: int = 32
    pad: int = 4
    pad_mode: str = "reflect"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise KdpipeError(f"unknown view kind {self.kind!r}; use one of {KINDS}")
        if int(self.size) < 1:
            raise KdpipeError(f"view size must be a positive number of pixels, got {self.size}")
        if int(self.pad) < 0:
            raise KdpipeError(f"view pad must be >= 0, got {self.pad}")
        if self.pad_mode not in PAD_MODES:
            raise KdpipeError(f"unknown pad_mode {self.pad_mode!r}; use one of {PAD_MODES}")
        scale = (float(self.scale[0]), float(self.scale[1]))
        ratio = (float(self.ratio[0]), float(self.ratio[1]))
        if not (0.0 < scale[0] <= scale[1] <= 1.0):
            raise KdpipeError(f"rrc scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not (0.0 < ratio[0] <= ratio[1]):
            raise KdpipeError(f"rrc ratio must satisfy 0 < lo <= hi, got {ratio}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "pad", int(self.pad))
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "flip", bool(self.flip))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "kind": self.kind,
            "size": self.size,
            "pad": self.pad,
            "pad_mode": self.pad_mode,
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "flip": self.flip,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewPolicy:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {"kind", "size", "pad", "pad_mode", "scale", "ratio", "flip"}
        extra = set(d) - known
        if extra:
            raise KdpipeError(f"view policy: unknown keys {sorted(extra)}; allowed: {sorted(known)}")
        kw = dict(d)
        for k in ("scale", "ratio"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


# -- counter-based random numbers ----------------------------------------------------------------------
def _u64(x: int) -> np.ndarray:
    return np.array([x & _MASK], dtype=np.uint64)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_uniform(seed: int, samples: np.ndarray, views: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1), shape (B, D), a pure function of (seed, sample, view, draw)."""
    s = np.asarray(samples, dtype=np.int64).view(np.uint64)
    v = np.asarray(views, dtype=np.int64).view(np.uint64)
    d = np.asarray(draws, dtype=np.int64).view(np.uint64)
    k = _mix(_u64(seed) + _u64(_GOLDEN))
    z = _mix(k ^ (s + _u64(2 * _GOLDEN)))
    z = _mix(z ^ (v + _u64(3 * _GOLDEN)))
    z = _mix(z[:, None] ^ (d[None, :] + _u64(4 * _GOLDEN)))
    return (z >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def _det_log(y: float) -> float:
    """Natural log with basic IEEE operations only (same bits on every machine)."""
    m, e = math.frexp(y)
    if m < 0.7071067811865476:
        m, e = m * 2.0, e - 1
    t = (m - 1.0) / (m + 1.0)
    t2 = t * t
    acc = 0.0
    for n in range(41, 0, -2):
        acc = acc * t2 + 1.0 / n
    return 2.0 * t * acc + e * _LN2


def _det_exp(x: np.ndarray) -> np.ndarray:
    """exp(x) for float64 arrays of moderate size with basic IEEE operations and an exact ldexp."""
    k = np.rint(x / _LN2)
    r = x - k * _LN2
    p = np.ones_like(r)
    for n in range(20, 0, -1):
        p = p * (r / n) + 1.0
    return np.ldexp(p, k.astype(np.int32))


def _uniform_int(u: np.ndarray, n: np.ndarray) -> np.ndarray:
    """floor(u * n) for u in [0, 1), clipped to n - 1: an integer in [0, n)."""
    return np.minimum(np.floor(u * n), n - 1).astype(np.int64)


# -- parameters -----------------------------------------------------------------------------------------
def plain_view_params(policy: ViewPolicy, sizes: np.ndarray) -> np.ndarray:
    """(B,5) int32 parameters of the plain view for images of sizes (B,2) (H,W)."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    off = policy.pad if policy.kind == "pad-crop" else 0
    out = np.zeros((sizes.shape[0], 5), np.int64)
    out[:, 0] = off
    out[:, 1] = off
    out[:, 2:4] = sizes
    return out.astype(np.int32)


def _rrc(policy: ViewPolicy, u: np.ndarray, H: np.ndarray, W: np.ndarray) -> np.ndarray:
    Hf, Wf = H.astype(np.float64), W.astype(np.float64)
    area = (Hf * Wf)[:, None]
    s0, s1 = policy.scale
    target = area * (s0 + u[:, _DRAW_AREA : _DRAW_AREA + _RRC_TRIES] * (s1 - s0))
    lo, hi = _det_log(policy.ratio[0]), _det_log(policy.ratio[1])
    aspect = _det_exp(lo + u[:, _DRAW_RATIO : _DRAW_RATIO + _RRC_TRIES] * (hi - lo))
    w_try = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h_try = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w_try > 0) & (w_try <= W[:, None]) & (h_try > 0) & (h_try <= H[:, None])
    first = np.argmax(ok, axis=1)
    rows = np.arange(len(H))
    h = h_try[rows, first]
    w = w_try[rows, first]
    y0 = _uniform_int(u[:, _DRAW_Y], H - h + 1)
    x0 = _uniform_int(u[:, _DRAW_X], W - w + 1)
    # fallback when no try fits: the largest centred box with an admissible aspect ratio
    fail = ~ok.any(axis=1)
    if fail.any():
        r0, r1 = policy.ratio
        in_ratio = Wf / Hf
        fw = W.copy()
        fh = H.copy()
        narrow = in_ratio < r0
        wide = in_ratio > r1
        fh = np.where(narrow, np.rint(Wf / r0).astype(np.int64), fh)
        fw = np.where(wide, np.rint(Hf * r1).astype(np.int64), fw)
        fh = np.clip(fh, 1, H)
        fw = np.clip(fw, 1, W)
        h = np.where(fail, fh, h)
        w = np.where(fail, fw, w)
        y0 = np.where(fail, (H - fh) // 2, y0)
        x0 = np.where(fail, (W - fw) // 2, x0)
    return np.stack([y0, x0, h, w], axis=1)


def draw_view_params(
    policy: ViewPolicy, seed: int, samples: np.ndarray, views: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """Parameters of view ``views[b]`` of sample ``samples[b]`` for an image of size ``sizes[b]``.

    samples, views: (B,) int64 (view -1 = the plain view); sizes: (B,2) int (H, W) of the source image.
    Returns (B,5) int32 in ``VIEW_FIELDS`` order; see the module docstring for the coordinates.
    """
    samples = np.asarray(samples, dtype=np.int64).reshape(-1)
    views = np.asarray(views, dtype=np.int64).reshape(-1)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    if not (len(samples) == len(views) == len(sizes)):
        raise KdpipeError(
            f"draw_view_params: samples {samples.shape}, views {views.shape} and sizes {sizes.shape} differ"
        )
    if (sizes < 1).any():
        raise KdpipeError("draw_view_params: image sizes must be positive")
    out = plain_view_params(policy, sizes).astype(np.int64)
    aug = views >= 0
    if policy.kind == "none" or not aug.any():
        return out.astype(np.int32)
    u = hash_uniform(seed, samples[aug], views[aug], np.arange(_DRAW_FLIP + 1))
    H, W = sizes[aug, 0], sizes[aug, 1]
    if policy.kind == "pad-crop":
        Hp, Wp = H + 2 * policy.pad, W + 2 * policy.pad
        if (Hp < policy.size).any() or (Wp < policy.size).any():
            raise KdpipeError(
                f"pad-crop: images of {int(H.min())}x{int(W.min())} px padded by {policy.pad} are smaller "
                f"than the crop size {policy.size}; lower size or raise pad"
            )
        y0 = _uniform_int(u[:, _DRAW_Y], Hp - policy.size + 1)
        x0 = _uniform_int(u[:, _DRAW_X], Wp - policy.size + 1)
        box = np.stack([y0, x0, np.full_like(y0, policy.size), np.full_like(y0, policy.size)], axis=1)
    else:
        box = _rrc(policy, u, H, W)
    flip = (u[:, _DRAW_FLIP] < 0.5).astype(np.int64) if policy.flip else np.zeros(len(H), np.int64)
    out[aug, :4] = box
    out[aug, 4] = flip
    return out.astype(np.int32)


# -- application ----------------------------------------------------------------------------------------
def apply_views(images: np.ndarray | list[np.ndarray], params: np.ndarray, policy: ViewPolicy) -> np.ndarray:
    """Make the views: images (B,H,W,C) uint8 or a list of (H_b,W_b,C) uint8, params (B,5).

    Returns (B, size, size, C) uint8. A same-size batch is handled with one set of gathers over the
    whole batch; a list of differently sized images is processed image by image (each vectorised).
    """
    params = np.asarray(params, dtype=np.int64).reshape(-1, 5)
    size = policy.size
    pad = policy.pad if policy.kind == "pad-crop" else 0
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise KdpipeError(
                f"apply_views: expected uint8 (B,H,W,C) images, got {images.dtype} {images.shape}"
            )
        if len(images) != len(params):
            raise KdpipeError(f"apply_views: {len(images)} images but {len(params)} view parameter rows")
        src = pad_images(images, pad, policy.pad_mode)
        y0, x0, h, w, flip = params.T
        return crop_resize_batch(src, y0, x0, h, w, flip, size)
    if len(images) != len(params):
        raise KdpipeError(f"apply_views: {len(images)} images but {len(params)} view parameter rows")
    channels = {int(im.shape[2]) for im in images}
    if len(channels) > 1:
        raise KdpipeError(f"apply_views: images have different channel counts {sorted(channels)}")
    c = channels.pop() if channels else 1
    out = np.empty((len(images), size, size, c), np.uint8)
    for b, im in enumerate(images):
        src = pad_images(np.asarray(im, dtype=np.uint8)[None], pad, policy.pad_mode)
        y0, x0, h, w, flip = params[b : b + 1].T
        out[b] = crop_resize_batch(src, y0, x0, h, w, flip, size)[0]
    return out
