"""High-norm outlier tokens in transformer energy maps, and the ``--token-clip Q`` remedy.

Large ViTs trained long keep a few patch tokens with much larger norms than the rest (Darcet et al.
2024, "Vision Transformers Need Registers"), mostly on background patches.
In ``at = l2n(mean_c(F**2))`` such a token takes most of the map's mass, so the map is a few bright
cells, not where the object is, and AT/DCT/AFD then ask the student to copy those cells.

Remedy: clip each sample's map at its own Q-quantile before the L2 normalisation,
``at = l2n(min(a, q_Q(a)))`` with ``q_Q`` the nearest-rank quantile (the ceil(Q*N)-th smallest of the N
patch-token energies). Clipping commutes with a positive scale, so it is applied to the normalised
maps (graph or native reduce alike) and renormalised; with clipping the DCT targets are computed from
the clipped maps by the native op.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from kdpipe.errors import KdpipeError


def check_clip(q: float | None) -> None:
    """KdpipeError unless ``q`` is None (off) or in (0, 1)."""
    if q is not None and not 0.0 < q < 1.0:
        raise KdpipeError(f"--token-clip {q}: give a quantile between 0 and 1 (e.g. 0.98), or leave it off")


def clip_maps(maps: np.ndarray, q: float) -> np.ndarray:
    """(N, h, w) maps -> float32 ``l2n(min(a, q-quantile of a))`` per sample, computed in float64."""
    a = np.asarray(maps, dtype=np.float64)
    a = a.reshape(len(a), int(np.prod(a.shape[1:])))
    # Q as the decimal it was given: in floats 0.55 * 100 is 55.000000000000007, whose ceil is 56
    k = max(1, math.ceil(Fraction(repr(float(q))) * a.shape[1]))
    thr = np.partition(a, k - 1, axis=1)[:, k - 1 : k]
    c = np.minimum(a, thr)
    c /= np.maximum(np.sqrt((c * c).sum(axis=1, keepdims=True)), 1e-12)
    return c.reshape(maps.shape).astype(np.float32)


def outlier_stats(maps: np.ndarray) -> dict[str, float]:
    """How much a few cells dominate normalised maps (N, h, w): the mean share of the squared L2 mass
    in each sample's largest cell, and the mean ratio of the largest cell to the median cell."""
    if len(maps) == 0:
        raise KdpipeError("outlier statistics need at least one map; the batch given is empty")
    a = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    mass = a * a
    top = mass.max(axis=1) / np.maximum(mass.sum(axis=1), 1e-300)
    ratio = a.max(axis=1) / np.maximum(np.median(a, axis=1), 1e-300)
    return {"top_cell_mass": float(top.mean()), "max_over_median": float(ratio.mean())}
