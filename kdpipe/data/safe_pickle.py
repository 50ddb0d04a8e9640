"""Read a pickled NumPy array without letting the pickle run arbitrary code.

A pickle can name any importable callable; ``pickle.load`` would call it. The unpickler here resolves
only the globals that NumPy's own ``ndarray.__reduce__`` emits (checked with ``pickletools`` on the
animal-shape-mnist files): ``numpy.core.multiarray._reconstruct`` (or ``numpy._core...``),
``numpy.ndarray`` and ``numpy.dtype``, plus ``numpy._core.numeric._frombuffer`` that NumPy >= 1.16
uses for pickle protocol 5. Object dtypes are refused too, and the result must be a plain
``np.ndarray``. Protocol 2 pickles of arrays (which need ``_codecs.encode``) are not accepted.
"""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.errors import KdpipeError

try:  # NumPy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]


def _safe_dtype(*args: Any, **kwargs: Any) -> np.dtype:
    dt = np.dtype(*args, **kwargs)
    if dt.hasobject:
        raise pickle.UnpicklingError("refusing an object dtype in a pickled array")
    return dt


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    dt = _safe_dtype(dtype)
    return np.frombuffer(buf, dtype=dt).reshape(shape, order=order)  # type: ignore[call-overload]


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only NumPy array reconstruction globals; anything else raises."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a pickle") from None


def loads_array(data: bytes) -> np.ndarray:
    """Unpickle ``data`` (bytes of one pickled ndarray) with :class:`RestrictedUnpickler`."""
    obj = RestrictedUnpickler(io.BytesIO(data)).load()
    if type(obj) is not np.ndarray:
        raise pickle.UnpicklingError(f"expected a numpy array in the pickle, got {type(obj).__name__}")
    return obj


def load_gzip_array(path: str | Path) -> np.ndarray:
    """Read a gzipped pickle holding one NumPy array; unsafe or broken content -> KdpipeError."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
        return loads_array(data)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise KdpipeError(f"cannot read array from {path}: {e}") from None
