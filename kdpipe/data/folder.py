"""A folder of class sub-folders holding JPEG/PNG images, decoded with Pillow in worker threads.

Layout: ``root/<class>/.../<image>.{jpg,jpeg,png}`` (extension case-insensitive, files found recursively
inside each class folder, hidden entries skipped). Classes are the sorted sub-folder names; samples are
ordered by class, then by relative path. Images may differ in size. They are converted to "L" (1
channel) when every file is a grey-scale image and to "RGB" otherwise (alpha dropped; EXIF orientation
is not applied, like torchvision's ImageFolder).

``content_sha256`` hashes the sorted list of "relative/path<TAB>byte size" lines (not mtimes, which
change on copy; not the bytes, which would need a full read): edit a file in place with the same size
and the fingerprint does not notice.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from kdpipe.data.dataset import Dataset, as_indices
from kdpipe.errors import KdpipeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def decoder_versions() -> dict[str, str | None]:
    """The versions behind FolderDataset's decoding: Pillow and its libjpeg-turbo."""
    import PIL
    from PIL import features

    return {"pillow": PIL.__version__, "libjpeg_turbo": features.version("libjpeg_turbo")}


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def scan_classes(root: Path) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of ``root``."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_files(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / f)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


class FolderDataset(Dataset):
    """Images in class sub-folders of ``root``.

    class_names: the classes to use (e.g. the train classes for a val folder); folders not among them
    are an error. None: the sorted sub-folder names.
    """

    def __init__(
        self,
        root: str | Path,
        name: str,
        class_names: list[str] | None = None,
        workers: int | None = None,
        skip_bad: bool = False,
        exclude: tuple[str, ...] | list[str] = (),
    ) -> None:
        self.root = Path(root)
        self.name = name
        self.workers = workers or _default_workers()
        if not self.root.is_dir():
            raise KdpipeError(f"dataset folder {self.root} does not exist")
        found = scan_classes(self.root)
        if not found:
            raise KdpipeError(
                f"dataset folder {self.root} has no class sub-folders; put the images of each class in "
                "their own sub-folder (root/<class>/<image>.jpg)"
            )
        if class_names is None:
            class_names = found
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise KdpipeError(
                f"dataset folder {self.root} has class folders {unknown} that are not in the train classes; "
                "use the same class folders in train/ and val/"
            )
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        files: list[str] = []
        labels: list[int] = []
        for label, cls in enumerate(self.class_names):
            folder = self.root / cls
            if not folder.is_dir():
                continue
            for p in _scan_files(folder):
                files.append(p.relative_to(self.root).as_posix())
                labels.append(label)
        if not files:
            raise KdpipeError(
                f"dataset folder {self.root} holds no images with extensions {IMAGE_EXTENSIONS} in its "
                "class sub-folders"
            )
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self._sizes: np.ndarray | None = None
        self._grey: bool | None = None
        self._sha: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = os.getpid()
        self._lock = threading.Lock()
        self.skipped: list[str] = []  # relative paths left out (--skip-bad, or a cache's record of them)
        if exclude:
            self._drop(set(exclude))
        if skip_bad:
            ok = list(self._executor().map(self._readable, self.files))
            self._drop({rel for rel, good in zip(self.files, ok, strict=True) if not good})

    def _readable(self, rel: str) -> bool:
        """Whether the file decodes completely (a full decode: truncated data fails only there)."""
        try:
            with Image.open(self.root / rel) as im:
                im.load()
            return True
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            return False

    def _drop(self, bad: set[str]) -> None:
        keep = [k for k, rel in enumerate(self.files) if rel not in bad]
        self.skipped = sorted(set(self.skipped) | (bad & set(self.files)))
        self.files = [self.files[k] for k in keep]
        self.labels = self.labels[keep]
        if not self.files:
            raise KdpipeError(
                f"dataset folder {self.root}: no readable image left after skipping unreadable ones"
            )

    # -- pickling (for DataLoader workers): drop the thread pool and lock -----------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pool"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool_pid != os.getpid():
            # a forked child (DataLoader worker): the parent's pool threads do not exist here, and its
            # lock may have been copied held; waiting on either would hang the worker forever
            self._pool, self._pool_pid, self._lock = None, os.getpid(), threading.Lock()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kdpipe-decode")
            return self._pool

    def _path(self, i: int) -> Path:
        return self.root / self.files[i]

    # -- headers ----------------------------------------------------------------------------------------
    def _header(self, i: int) -> tuple[int, int, str]:
        path = self._path(i)
        try:
            with Image.open(path) as im:
                w, h = im.size
                return h, w, im.mode
        except (OSError, UnidentifiedImageError) as e:
            raise KdpipeError(
                f"cannot read image header of {path}: {e}; remove or replace the file, or pass --skip-bad"
            ) from None

    def _scan_headers(self) -> None:
        heads = list(self._executor().map(self._header, range(len(self.files))))
        self._sizes = np.array([(h, w) for h, w, _ in heads], dtype=np.int32).reshape(-1, 2)
        self._grey = all(mode in _GREY_MODES for _, _, mode in heads)

    def sizes(self) -> np.ndarray:
        """int32 (N,2) (H,W) from the file headers only; computed once and cached."""
        if self._sizes is None:
            self._scan_headers()
        assert self._sizes is not None
        return self._sizes

    @property
    def channels(self) -> int:
        if self._grey is None:
            self._scan_headers()
        return 1 if self._grey else 3

    # -- pixels -----------------------------------------------------------------------------------------
    def _decode(self, i: int, mode: str) -> np.ndarray:
        path = self._path(i)
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert(mode), dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise KdpipeError(
                f"cannot decode image {path}: {e}; remove or replace the file, or pass --skip-bad"
            ) from None
        return arr[:, :, None] if arr.ndim == 2 else arr

    def load(self, indices: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Decode images in parallel threads; (B,H,W,C) uint8 when all share a size, else a list."""
        idx = as_indices(indices, len(self))
        mode = "L" if self.channels == 1 else "RGB"
        if len(idx) == 0:
            return np.zeros((0, 0, 0, self.channels), np.uint8)
        images = list(self._executor().map(lambda i: self._decode(int(i), mode), idx))
        if len({im.shape for im in images}) == 1:
            return np.stack(images)
        return images

    def decoder(self, probes: int = 4) -> dict[str, Any]:
        """What decodes the images, and what it makes of them: {"decoder": "pillow", "probe_files": the
        first ``probes`` files, "pixels_sha256": the sha256 of their decoded uint8 pixels}. A cache
        records it; distill checks that its machine decodes the probe files to the same pixels (the
        teacher and the student must see the same pixels; docs/cache-format.md)."""
        mode = "L" if self.channels == 1 else "RGB"
        h = hashlib.sha256()
        picks = list(range(min(probes, len(self.files))))
        for i in picks:
            arr = self._decode(i, mode)
            h.update(f"{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return {
            "decoder": "pillow",
            "probe_files": [self.files[i] for i in picks],
            "pixels_sha256": h.hexdigest(),
        }

    def check_decoder(self, record: dict[str, Any], made_with: dict[str, Any], where: str) -> None:
        """Refuse (one line) to replay images this machine decodes to other pixels than ``record``."""
        probes = [self.files.index(f) for f in record.get("probe_files", []) if f in self.files]
        if len(probes) != len(record.get("probe_files", [])) or probes != list(range(len(probes))):
            return  # another file list: the dataset fingerprint check speaks for that
        if self.decoder(len(probes))["pixels_sha256"] != record.get("pixels_sha256"):
            here = decoder_versions()
            raise KdpipeError(
                f"{where}: {record['probe_files'][0]}... decode to other pixels here than when the cache "
                "was made (the files were changed in place, or the decoder differs: Pillow "
                f"{made_with.get('pillow')} / libjpeg-turbo {made_with.get('libjpeg_turbo')} then, "
                f"{here['pillow']} / {here['libjpeg_turbo']} here), so the student would not see the "
                f"teacher's pixels; restore the files, install Pillow=={made_with.get('pillow')}, or "
                "re-run cache-teacher"
            )

    def content_sha256(self) -> str:
        if self._sha is None:
            h = hashlib.sha256()
            for rel in sorted(self.files):
                h.update(f"{rel}\t{(self.root / rel).stat().st_size}\n".encode())
            self._sha = h.hexdigest()
        return self._sha
