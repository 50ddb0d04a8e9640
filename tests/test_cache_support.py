"""Shared helpers for the cache tests (no tests here): a manifest and deterministic reference data.

The reference is a closed-form function of (sample, view, element) in float64/int64 NumPy, so tests
compare what the cache returns with numbers computed independently of kdpipe.cache.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

TESTS_DIR = str(Path(__file__).resolve().parent)

DTYPE_ARRAYS = {
    "logits": {"shape": [5], "dtype": "float32", "per": "view"},
    "at.0": {"shape": [3, 4], "dtype": "float16", "per": "view"},
    "dct.dft-abs.0": {"shape": [3, 4], "dtype": "bfloat16", "per": "view"},
    "pooled.0": {"shape": [6], "dtype": "float16", "per": "view"},
    "at.1": {"shape": [2, 2], "dtype": "float32", "per": "view"},
    "pooled.1": {"shape": [3], "dtype": "bfloat16", "per": "view"},
    "view_params": {"shape": [5], "dtype": "int32", "per": "view"},
    "labels": {"shape": [], "dtype": "int64", "per": "sample"},
}


def make_manifest(num_samples: int = 50, num_views: int = 3, chunk_size: int = 8, **extra: object) -> dict:
    return {
        "num_samples": num_samples,
        "num_views": num_views,
        "chunk_size": chunk_size,
        "arrays": {k: dict(v) for k, v in DTYPE_ARRAYS.items()},
        "taps": [{"name": "layer1", "shape": [8, 3, 4]}, {"name": "layer2", "shape": [3, 2, 2]}],
        "teacher": {"sha256": "ab" * 32},
        "dataset": {"count": num_samples, "sha256": "cd" * 32},
        "views": {"kind": "pad-crop", "seed": 0},
        **extra,
    }


def reference(manifest: dict, s0: int, s1: int) -> dict[str, np.ndarray]:
    """float64 (or int64) values of every array for samples [s0, s1): [sample, view, ...]."""
    V = manifest["num_views"]
    s = np.arange(s0, s1, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for k, (name, spec) in enumerate(manifest["arrays"].items()):
        shape = tuple(spec["shape"])
        per_view = spec["per"] == "view"
        full = (s1 - s0,) + ((V,) if per_view else ()) + shape
        e = np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.float64).reshape(shape)
        ss = s.reshape((-1,) + (1,) * (len(full) - 1))
        vv = np.arange(V, dtype=np.float64).reshape((1, V) + (1,) * len(shape)) if per_view else 0.0
        if spec["dtype"].startswith("int"):
            out[name] = (ss * 1000 + vv * 10 + e + k).astype(np.int64) * np.ones(full, np.int64)
        else:
            out[name] = np.sin(ss * 0.37 + vv * 1.3 + e * 0.11 + k) * 3.0 * np.ones(full)
    return out


FLOATS = ("float32", "float16", "bfloat16")


def stored_form(ref: np.ndarray, dt: str) -> np.ndarray:
    """Reference values in storage form with plain NumPy (bf16: round-to-nearest-even of the f32 bits)."""
    if dt == "float32":
        return ref.astype(np.float32)
    if dt == "float16":
        return ref.astype(np.float16)
    if dt == "bfloat16":
        b = ref.astype(np.float32).view(np.uint32).astype(np.uint64)
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return ref.astype(np.dtype(dt))


def chunk_arrays(manifest: dict, s0: int, s1: int, storage: bool = False) -> dict[str, np.ndarray]:
    """The reference rows as a caller passes them to write_chunk: float32 (converted by the writer)
    or, with ``storage``, already in the storage dtype."""
    out = {}
    for n, a in reference(manifest, s0, s1).items():
        dt = manifest["arrays"][n]["dtype"]
        out[n] = stored_form(a, dt) if storage else (a.astype(np.float32) if dt in FLOATS else a)
    return out


def expected_stored(manifest: dict, name: str) -> np.ndarray:
    """What the cache must hold for ``name``, computed with plain NumPy."""
    ref = reference(manifest, 0, manifest["num_samples"])[name]
    return stored_form(ref, manifest["arrays"][name]["dtype"])


def decoded(manifest: dict, name: str) -> np.ndarray:
    """expected_stored decoded to float32 (bf16 bits shifted back) or the int array."""
    st = expected_stored(manifest, name)
    if manifest["arrays"][name]["dtype"] == "bfloat16":
        return (st.astype(np.uint32) << 16).view(np.float32)
    return st.astype(np.float32) if st.dtype.kind == "f" else st


def write_shard(
    path: str,
    manifest: dict,
    shard: tuple[int, int],
    log: str | None = None,
    delay: float = 0.0,
    storage: bool = False,
) -> None:
    """Write every pending chunk of one shard; append each finished chunk index to ``log``."""
    from kdpipe.cache import create_or_resume

    w = create_or_resume(path, manifest, shard)
    for c in w.pending_chunks():
        s0, s1 = w.chunk_range(c)
        w.write_chunk(c, chunk_arrays(manifest, s0, s1, storage))
        if log:
            with open(log, "a") as f:
                f.write(f"{c}\n")
        if delay:
            time.sleep(delay)
    w.finish()


def child_script(
    path: str, manifest: dict, shard: tuple[int, int], log: str | None, delay: float
) -> list[str]:
    """argv for a separate Python process running write_shard with arrays already in storage dtype
    (so the child never converts, needs neither native ops nor torch, and starts fast)."""
    code = (
        f"import sys, json; sys.path.insert(0, {TESTS_DIR!r}); import test_cache_support as t; "
        f"t.write_shard({path!r}, json.loads(sys.argv[1]), {tuple(shard)!r}, {log!r}, {delay!r}, True)"
    )
    import json

    return [sys.executable, "-c", code, json.dumps(manifest)]
