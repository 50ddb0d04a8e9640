"""Training batches: which samples and views each step sees, and one vectorised gather per batch.

The order of epoch ``e`` is a pure function of (seed, e), and the view of sample ``s`` in epoch ``e`` is
``(e + offset[s]) % K`` with a seeded per-sample offset: every sample cycles through all its K cached
views every K epochs, and a resumed run sees exactly the batches the killed run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdpipe.errors import KdpipeError


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """A permutation of range(n), int64, fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0x6B64]).permutation(n).astype(np.int64)


def chunked_epoch_order(seed: int, epoch: int, n: int, chunk: int, window: int) -> np.ndarray:
    """A permutation of range(n), int64, fixed by (seed, epoch), that stays inside windows of chunks.

    The ``ceil(n / chunk)`` chunks (consecutive sample ranges of ``chunk`` samples, as the cache stores
    them) are shuffled and grouped ``window`` at a time; the samples of each group are shuffled among
    themselves, and the groups follow each other. So consecutive batches read from at most ``window``
    chunks (two where a batch straddles groups), which can be read ahead as whole ranges.
    """
    if chunk < 1 or window < 1:
        raise ValueError("chunk and window must be >= 1")
    rng = np.random.default_rng([seed, epoch, 0x636B])
    chunks = rng.permutation(-(-n // chunk))
    parts = []
    for g in range(0, len(chunks), window):
        ranges = [np.arange(c * chunk, min(n, (c + 1) * chunk)) for c in chunks[g : g + window]]
        members = np.concatenate(ranges)
        parts.append(rng.permutation(members))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def epoch_views(seed: int, epoch: int, samples: np.ndarray, num_views: int) -> np.ndarray:
    """View index per sample for this epoch (int64), cycling through all views every K epochs."""
    if num_views <= 1:
        return np.zeros(len(samples), dtype=np.int64)
    offsets = np.random.default_rng([seed, 0x7669]).integers(0, num_views, size=int(samples.max()) + 1)
    return (epoch + offsets[samples]) % num_views


def rank_batches(order: np.ndarray, batch_size: int, rank: int, world: int) -> list[np.ndarray]:
    """Split an epoch order into this rank's batches (drop_last: every rank gets the same count)."""
    per_step = batch_size * world
    steps = len(order) // per_step
    if steps == 0:
        raise KdpipeError(
            f"--batch-size {batch_size} x {world} process(es) exceeds the {len(order)} samples of the "
            "data set: lower --batch-size"
        )
    used = order[: steps * per_step].reshape(steps, world, batch_size)
    return [used[s, rank] for s in range(steps)]


@dataclass
class BatchSource(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: key = (samples (B,), views (B,)).

    Returns ``{"x": float32 (B,C,H,W), "y": int64 (B,), "uint8": uint8 (B,H,W,C) when keep_uint8,
    "targets": {array name: float32 (B, ...)} when a cache is given}``.
    """

    dataset: Any
    policy: Any
    normalize: Any
    cache: Any = None
    target_names: tuple[str, ...] = ()
    view_seed: int = 0
    keep_uint8: bool = False

    def __len__(self) -> int:  # the DataLoader is driven by an explicit sampler of keys
        return 0

    def view_params(self, samples: np.ndarray, views: np.ndarray) -> np.ndarray:
        if self.cache is not None:
            return np.asarray(self.cache.view_params[samples, views], dtype=np.int32)
        from kdpipe.data.views import draw_view_params

        plain = self.policy.kind == "none"
        v = np.full_like(views, -1) if plain else views
        return draw_view_params(self.policy, self.view_seed, samples, v, self.dataset.sizes()[samples])

    def __getitem__(self, key: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        from kdpipe.data.views import apply_views

        samples, views = key
        params = self.view_params(samples, views)
        images = self.dataset.load(samples)
        u8 = apply_views(images, params, self.policy)
        out: dict[str, Any] = {
            "x": torch.from_numpy(np.ascontiguousarray(self.normalize(u8))),
            "y": torch.from_numpy(self.dataset.labels[samples].astype(np.int64)),
        }
        if self.keep_uint8:
            out["uint8"] = u8
        if self.cache is not None:
            out["targets"] = {
                name: torch.from_numpy(self.cache.gather(name, samples, views)) for name in self.target_names
            }
        return out


class EpochKeys(torch.utils.data.Sampler):
    """The batch keys of the current epoch. The sampler lives in the main process, so replacing
    ``keys`` between epochs lets one DataLoader keep its worker processes for the whole run.

    ``hints`` (optional): key index -> a callable run when that key is handed to the loader (the
    chunk-local order's read-ahead of the next window); it runs as early as the loader prefetches.
    """

    def __init__(self) -> None:
        self.keys: list[tuple[np.ndarray, np.ndarray]] = []
        self.hints: dict[int, Any] = {}

    def __iter__(self) -> Any:
        for i, key in enumerate(self.keys):
            hint = self.hints.get(i)
            if hint is not None:
                hint()
            yield key

    def __len__(self) -> int:
        return len(self.keys)


def loader(source: BatchSource, sampler: EpochKeys, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    """A DataLoader over precomputed batch keys; workers gather whole batches in parallel and stay
    alive across epochs."""
    return torch.utils.data.DataLoader(
        source,  # type: ignore[arg-type]
        batch_size=None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=workers > 0,
    )
