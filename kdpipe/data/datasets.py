"""``load_dataset(spec)``: built-in names, .npz files and image folders.

Spec forms (":train" is the default split and may be written out):
- ``animals``, ``animals:val``, ``digits``, ``digits:val``: built-ins (:mod:`kdpipe.data.builtin`);
- ``path/to/file.npz`` (keys ``x`` uint8 (N,H,W) or (N,H,W,C) with C 1 or 3, ``y`` (N,) integers,
  optional ``class_names`` (K,) strings), ``path/to/file.npz:val`` (keys ``x_val``, ``y_val``);
- ``path/to/folder`` of class sub-folders (:mod:`kdpipe.data.folder`); when it holds ``train/`` and
  ``val/`` sub-folders, ``folder`` means ``folder/train`` and ``folder:val`` means ``folder/val``.

The dataset ``name`` (part of the fingerprint) is the built-in spec, or the file/folder base name with
":val" appended for the val split, so that moving a dataset does not change its fingerprint.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.data.builtin import BUILTINS
from kdpipe.data.dataset import ArrayDataset, Dataset, check_labels
from kdpipe.data.folder import FolderDataset, scan_classes
from kdpipe.errors import KdpipeError

SPLITS = ("train", "val")


def _split_spec(spec: str) -> tuple[str, str]:
    for split in SPLITS:
        if spec.endswith(":" + split):
            return spec[: -len(split) - 1], split
    return spec, "train"


def _display_name(path: Path, split: str) -> str:
    return path.name if split == "train" else f"{path.name}:{split}"


def load_npz(path: str | Path, split: str = "train") -> ArrayDataset:
    """Dataset from a .npz file; see the module docstring for the keys. Problems -> KdpipeError."""
    path = Path(path)
    xk, yk = ("x", "y") if split == "train" else ("x_val", "y_val")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            for k in (xk, yk):
                if k not in keys:
                    hint = " (the val split needs keys x_val and y_val)" if split == "val" else ""
                    raise KdpipeError(f"{path}: key {k!r} missing; found keys {sorted(keys)}{hint}")
            x = z[xk]
            y = z[yk]
            names = z["class_names"] if "class_names" in keys else None
    except KdpipeError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise KdpipeError(f"cannot read {path} as a .npz file: {e}") from None
    if x.dtype != np.uint8:
        raise KdpipeError(
            f"{path}: key {xk!r} must be uint8 images, got dtype {x.dtype}; convert with "
            "x.astype(np.uint8) after scaling to 0..255"
        )
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise KdpipeError(
            f"{path}: key {xk!r} must have shape (N,H,W) or (N,H,W,C) with C 1 or 3, got {x.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise KdpipeError(f"{path}: key {yk!r} must hold integer class labels, got dtype {y.dtype}")
    if y.ndim != 1 or len(y) != len(x):
        raise KdpipeError(f"{path}: key {yk!r} must have shape ({len(x)},) to match {xk!r}, got {y.shape}")
    y = y.astype(np.int64)
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise KdpipeError(
                f"{path}: key 'class_names' must be a 1-D array of strings, got {names.dtype} {names.shape}"
            )
        class_names = [str(n) for n in names.tolist()]
    else:
        class_names = [str(i) for i in range(int(y.max()) + 1 if len(y) else 0)]
    check_labels(y, len(class_names), f"{path}: key {yk!r}")
    x = np.ascontiguousarray(x)
    x.flags.writeable = False
    return ArrayDataset(x, y, class_names, _display_name(path, split))


def _has_split_folders(root: Path) -> bool:
    return (root / "train").is_dir() and bool(scan_classes(root / "train"))


def load_folder(path: str | Path, split: str = "train", **skip: Any) -> FolderDataset:
    """Dataset from an image folder; see the module docstring. ``skip``: FolderDataset's
    ``skip_bad`` and ``exclude``."""
    root = Path(path)
    if _has_split_folders(root):
        train_classes = scan_classes(root / "train")
        if split == "train":
            return FolderDataset(root / "train", _display_name(root, split), **skip)
        if not (root / "val").is_dir():
            raise KdpipeError(f"{root} has a train/ folder but no val/ folder for the ':val' split")
        return FolderDataset(root / "val", _display_name(root, split), class_names=train_classes, **skip)
    if split == "val":
        raise KdpipeError(
            f"{root}: the ':val' split needs train/ and val/ sub-folders, each with class sub-folders"
        )
    return FolderDataset(root, _display_name(root, split), **skip)


def available_builtins() -> list[str]:
    """Names of the built-in datasets (each also with ":val")."""
    return sorted(BUILTINS)


def load_dataset(spec: str, skip_bad: bool = False, exclude: tuple[str, ...] | list[str] = ()) -> Dataset:
    """Open the dataset named by ``spec`` (see the module docstring). Unknown or unusable -> KdpipeError.

    Image folders only: ``skip_bad`` leaves out the files that do not decode (listed in
    ``dataset.skipped``); ``exclude`` leaves out these relative paths (a cache's record of them).
    """
    spec = spec.strip()
    base, split = _split_spec(spec)
    if base in BUILTINS:
        return BUILTINS[base](split)
    path = Path(base).expanduser()
    if path.is_dir():
        return load_folder(path, split, skip_bad=skip_bad, exclude=tuple(exclude))
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return load_npz(path, split)
        raise KdpipeError(
            f"{path}: unsupported dataset file; use a .npz file or a folder of class sub-folders"
        )
    raise KdpipeError(
        f"dataset {spec!r} not found: not a built-in ({', '.join(available_builtins())}, each also ':val') "
        "and no such file or folder"
    )
