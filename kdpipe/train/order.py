"""The data order: which (samples, views) each step of an epoch sees on this rank.

A pure function of (seed, epoch, global batch, rank, world size) built on :mod:`kdpipe.batches`: the
global batch of step ``s`` holds the same samples and views whatever the number of processes, so a
run can resume mid-epoch, and on another number of processes, at any step.
"""

from __future__ import annotations

import numpy as np

from kdpipe.batches import epoch_order, epoch_views, rank_batches
from kdpipe.distributed import WorldInfo
from kdpipe.errors import KdpipeError


def epoch_keys(
    seed: int, epoch: int, n: int, num_views: int, batch: int, world: WorldInfo
) -> list[tuple[np.ndarray, np.ndarray]]:
    """This rank's batch keys of ``epoch``: (samples (batch,), views (batch,)) int64 per step."""
    order = epoch_order(seed, epoch, n)
    views = epoch_views(seed, epoch, order, num_views)
    view_of = np.empty(n, dtype=np.int64)
    view_of[order] = views
    try:
        batches = rank_batches(order, batch, world.rank, world.world_size)
    except ValueError as e:
        raise KdpipeError(f"--batch-size: {e}; choose a smaller batch") from None
    return [(b, view_of[b]) for b in batches]
