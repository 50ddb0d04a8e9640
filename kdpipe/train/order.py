"""The data order: which (samples, views) each step of an epoch sees on this rank.

A pure function of (seed, epoch, global batch, rank, world size, order) built on
:mod:`kdpipe.batches`: the global batch of step ``s`` holds the same samples and views whatever the
number of processes, so a run can resume mid-epoch, and on another number of processes, at any step.

``--order random`` (the default) shuffles all samples. ``--order chunked[:N]`` shuffles the cache's
chunks, then the samples inside windows of about N samples (whole chunks): a cache larger than memory
is then read window by window, each window read ahead in whole chunks (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdpipe.batches import chunked_epoch_order, epoch_order, epoch_views, rank_batches
from kdpipe.distributed import WorldInfo
from kdpipe.errors import KdpipeError

WINDOW_BYTES = 256 * 2**20  # default window of --order chunked: this many bytes of the rows read


@dataclass(frozen=True)
class ChunkedOrder:
    """Samples shuffled inside windows of ``window`` cache chunks of ``chunk`` samples."""

    chunk: int
    window: int


def parse_order(spec: str, cache: Any, names: list[str]) -> ChunkedOrder | None:
    """``--order``: "random" -> None; "chunked" or "chunked:N" (N samples per window) on a cache."""
    kind, _, arg = spec.partition(":")
    if kind == "random" and not arg:
        return None
    if kind != "chunked":
        raise KdpipeError(f"--order {spec!r}: use random, chunked or chunked:SAMPLES (e.g. chunked:65536)")
    if cache is None:
        raise KdpipeError("--order chunked follows the chunks of a cache: use it with --cache")
    lay = cache.layout
    chunk = lay.chunk_size
    if arg:
        try:
            samples = int(arg)
        except ValueError:
            samples = 0
        if samples < 1:
            raise KdpipeError(f"--order {spec!r}: the window must be a positive number of samples")
        window = max(1, round(samples / chunk))
    else:
        row = sum(lay.arrays[n].row_bytes(lay.num_views) for n in names if n in lay.arrays)
        window = max(1, WINDOW_BYTES // max(1, row * chunk))
    return ChunkedOrder(chunk=chunk, window=min(window, lay.num_chunks))


def epoch_keys(
    seed: int,
    epoch: int,
    n: int,
    num_views: int,
    batch: int,
    world: WorldInfo,
    chunked: ChunkedOrder | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """This rank's batch keys of ``epoch``: (samples (batch,), views (batch,)) int64 per step."""
    if chunked is None:
        order = epoch_order(seed, epoch, n)
    else:
        order = chunked_epoch_order(seed, epoch, n, chunked.chunk, chunked.window)
    views = epoch_views(seed, epoch, order, num_views)
    view_of = np.empty(n, dtype=np.int64)
    view_of[order] = views
    try:
        batches = rank_batches(order, batch, world.rank, world.world_size)
    except ValueError as e:
        raise KdpipeError(f"--batch-size: {e}; choose a smaller batch") from None
    return [(b, view_of[b]) for b in batches]


def read_ahead_plan(
    keys: list[tuple[np.ndarray, np.ndarray]], chunked: ChunkedOrder, global_batch: int
) -> dict[int, list[int]]:
    """Key index -> the cache chunks to read ahead when that key is handed out: at the first key the
    first two windows' chunks, then at the start of each window the chunks of the one after it."""
    per = max(1, chunked.window * chunked.chunk // global_batch)  # steps per window
    plan: dict[int, list[int]] = {}
    for i in range(0, len(keys), per):
        lo, hi = (0 if i == 0 else i + per), min(len(keys), i + 2 * per)
        if lo < hi:
            samples = np.concatenate([keys[j][0] for j in range(lo, hi)])
            plan[i] = np.unique(samples // chunked.chunk).tolist()
    return plan


class ReadAhead:
    """Runs a cache's read-ahead hints in one background thread, so handing out keys never waits."""

    def __init__(self, cache: Any, names: list[str]) -> None:
        self.cache, self.names = cache, names
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kdpipe-readahead")

    def hints(self, plan: dict[int, list[int]]) -> dict[int, Callable[[], None]]:
        def hint(chunks: list[int]) -> Callable[[], None]:
            def start() -> None:
                self._pool.submit(self.cache.read_ahead, self.names, chunks)

            return start

        return {i: hint(chunks) for i, chunks in plan.items()}


def class_mix(labels: np.ndarray, keys: list[tuple[np.ndarray, np.ndarray]], steps: int = 50) -> float:
    """Mean number of distinct labels in the first ``steps`` batches of ``keys``."""
    return float(np.mean([len(np.unique(labels[k[0]])) for k in keys[:steps]])) if keys else 0.0
