"""The Dataset interface, the in-memory array dataset, fingerprints and the fixed stratified split."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from kdpipe.data.views import hash_uniform
from kdpipe.errors import KdpipeError


def labels_sha256(labels: np.ndarray) -> str:
    """sha256 of the labels as little-endian int64 bytes."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


def as_indices(indices: np.ndarray | list[int], n: int) -> np.ndarray:
    """Validate sample indices (any integer array-like) against a dataset of n samples -> int64 (B,)."""
    idx = np.asarray(indices)
    if idx.size == 0:
        return np.zeros(0, np.int64)
    if not np.issubdtype(idx.dtype, np.integer):
        raise KdpipeError(f"sample indices must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64).reshape(-1)
    if idx.min() < 0 or idx.max() >= n:
        raise KdpipeError(f"sample index out of range: valid 0..{n - 1}, got {idx.min()}..{idx.max()}")
    return idx


class Dataset(ABC):
    """A labelled image dataset.

    Attributes: ``name`` (spec name), ``labels`` int64 (N,), ``num_classes``, ``class_names``,
    ``channels`` (1 or 3). Images are uint8 HWC.
    """

    name: str
    labels: np.ndarray
    num_classes: int
    class_names: list[str]

    def __len__(self) -> int:
        return int(len(self.labels))

    @property
    @abstractmethod
    def channels(self) -> int:
        """1 (grey) or 3 (RGB)."""

    @abstractmethod
    def sizes(self) -> np.ndarray:
        """int32 (N,2): (H, W) of every image, without decoding pixels."""

    @abstractmethod
    def load(self, indices: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """uint8 images for ``indices``: (B,H,W,C) when all have one size, else a list of (H,W,C)."""

    @abstractmethod
    def content_sha256(self) -> str:
        """sha256 identifying the image content (see the subclass)."""

    def fingerprint(self) -> dict[str, Any]:
        """{"name", "count", "num_classes", "labels_sha256", "content_sha256"}."""
        return {
            "name": self.name,
            "count": len(self),
            "num_classes": int(self.num_classes),
            "labels_sha256": labels_sha256(self.labels),
            "content_sha256": self.content_sha256(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n={len(self)}, classes={self.num_classes})"


class ArrayDataset(Dataset):
    """Images held in memory as one uint8 (N,H,W,C) array.

    ``content_sha256`` hashes the shape (as text) followed by the C-ordered array bytes.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: list[str], name: str) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
            raise KdpipeError(
                f"{name}: images must be uint8 (N,H,W,C) with C 1 or 3, got {images.dtype} {images.shape}"
            )
        if labels.shape != (images.shape[0],):
            raise KdpipeError(f"{name}: {images.shape[0]} images but labels of shape {labels.shape}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.name = name
        self._sha: str | None = None

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    def sizes(self) -> np.ndarray:
        return np.tile(np.array(self.images.shape[1:3], np.int32), (len(self), 1))

    def load(self, indices: np.ndarray) -> np.ndarray:
        return self.images[as_indices(indices, len(self))]

    def content_sha256(self) -> str:
        if self._sha is None:
            h = hashlib.sha256(str(tuple(self.images.shape)).encode())
            h.update(np.ascontiguousarray(self.images).data)
            self._sha = h.hexdigest()
        return self._sha


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Labels must lie in [0, num_classes)."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise KdpipeError(
            f"{where}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}"
        )


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split -> (train indices, val indices), each sorted ascending, disjoint.

    Per class with n members, ``round_half_up(n * val_fraction)`` go to val: the members are ordered by
    a counter-based hash of (seed, index) (:func:`kdpipe.data.views.hash_uniform`, the same on every
    machine and NumPy version) and the last ones in that order form the val part.
    """
    labels = np.asarray(labels, dtype=np.int64)
    idx = np.arange(len(labels), dtype=np.int64)
    key = hash_uniform(seed, idx, np.zeros_like(idx), np.zeros(1, np.int64))[:, 0]
    order = np.lexsort((key, labels))  # by class, then by hash key
    sorted_labels = labels[order]
    classes, starts, counts = np.unique(sorted_labels, return_index=True, return_counts=True)
    n_val = np.floor(counts * val_fraction + 0.5).astype(np.int64)
    # position of each element inside its class run
    pos = np.arange(len(labels)) - np.repeat(starts, counts)
    is_val = pos >= np.repeat(counts - n_val, counts)
    return np.sort(order[~is_val]), np.sort(order[is_val])
