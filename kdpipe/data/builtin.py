"""Built-in datasets that ship inside installed packages (no download at run time).

``animals``: the 10,000 28x28 grey animal silhouettes of the PyPI package ``animal-shape-mnist``
(0.39, MIT), 10 balanced classes ``ANIMAL_CLASSES``. Stored as shipped: white (255) silhouette on a
black (0) background, like MNIST. Split: per class the last 20% (200 of 1000) in the order of a
counter-based hash with seed ``SPLIT_SEED`` are "val"; the rest (8,000 images) is the train split.

``digits``: scikit-learn's 1,797 8x8 handwritten digits (values 0..16, ink high), scaled to uint8 with
``(v * 255 + 8) // 16`` and upsampled to 32x32 (so that CIFAR-style 32 px recipes apply unchanged) with
the bilinear resize of :mod:`kdpipe.data.transforms`; grey, 1 channel. Same split rule (20% per class,
seed ``SPLIT_SEED``): 1,438 train, 359 val.

The array loads are cached per process; the arrays are read-only.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kdpipe.data.dataset import ArrayDataset, Dataset, stratified_split
from kdpipe.data.safe_pickle import load_gzip_array
from kdpipe.data.transforms import crop_resize_batch
from kdpipe.errors import KdpipeError

SPLIT_SEED = 20240611
VAL_FRACTION = 0.2
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
DIGIT_SIZE = 32
_ANIMAL_DIR = ("data", "Animal Shape")
_ANIMAL_IMAGES = "animal_data_version_3.gz"
_ANIMAL_LABELS = "animal_label_version_3.gz"


def _animal_files() -> tuple[Path, Path]:
    """Paths of the two data files, found without importing the package (its loader imports TensorFlow)."""
    hint = "install it with: pip install animal-shape-mnist==0.39"
    try:
        spec = importlib.util.find_spec("animal_shape_mnist")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise KdpipeError(f"built-in dataset 'animals' needs the package animal-shape-mnist; {hint}")
    for root in spec.submodule_search_locations:
        folder = Path(root).joinpath(*_ANIMAL_DIR)
        images, labels = folder / _ANIMAL_IMAGES, folder / _ANIMAL_LABELS
        if images.is_file() and labels.is_file():
            return images, labels
    raise KdpipeError(f"animal-shape-mnist is installed but its data files are missing; {hint}")


@functools.lru_cache(maxsize=1)
def _animal_arrays() -> tuple[np.ndarray, np.ndarray]:
    img_path, lab_path = _animal_files()
    images = load_gzip_array(img_path)
    labels = load_gzip_array(lab_path)
    if images.dtype != np.uint8 or images.shape != (10000, 28, 28) or labels.shape != (10000,):
        raise KdpipeError(
            f"unexpected animal-shape-mnist content {images.dtype}{images.shape} / {labels.shape}; "
            "pip install animal-shape-mnist==0.39"
        )
    images = np.ascontiguousarray(images[..., None])
    labels = labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=1)
def _digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise KdpipeError("built-in dataset 'digits' needs scikit-learn; pip install scikit-learn") from None
    bunch = load_digits()
    raw = np.rint(bunch.images).astype(np.int64)  # (1797, 8, 8) in 0..16
    small = ((raw * 255 + 8) // 16).astype(np.uint8)[..., None]
    n = len(small)
    zeros = np.zeros(n, np.int64)
    eights = np.full(n, 8, np.int64)
    images = crop_resize_batch(small, zeros, zeros, eights, eights, zeros, DIGIT_SIZE)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _split_dataset(
    images: np.ndarray, labels: np.ndarray, class_names: list[str], base: str, split: str
) -> Dataset:
    train, val = stratified_split(labels, VAL_FRACTION, SPLIT_SEED)
    idx = val if split == "val" else train
    name = base if split == "train" else f"{base}:{split}"
    sub_images = images[idx]
    sub_labels = labels[idx]
    sub_images.flags.writeable = False
    return ArrayDataset(sub_images, sub_labels, class_names, name)


def animals(split: str = "train") -> Dataset:
    """The animal silhouettes, split "train" (8,000) or "val" (2,000); (28,28,1) uint8."""
    images, labels = _animal_arrays()
    return _split_dataset(images, labels, ANIMAL_CLASSES, "animals", split)


def digits(split: str = "train") -> Dataset:
    """scikit-learn digits at 32x32, split "train" (1,438) or "val" (359); (32,32,1) uint8."""
    images, labels = _digit_arrays()
    return _split_dataset(images, labels, [str(d) for d in range(10)], "digits", split)


BUILTINS: dict[str, Callable[[str], Dataset]] = {"animals": animals, "digits": digits}
