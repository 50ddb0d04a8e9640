"""Benchmark of the native target ops against plain NumPy and the machine's memory-read bandwidth.

Writes bench/results/ops.json and prints a table. Usage: ``python bench/ops.py [--quick]``.
Times are medians of several repeats after a warm-up; GB/s counts the activation's bytes once.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe import ops

RESULTS = Path(__file__).resolve().parent / "results" / "ops.json"


def median_ms(repeats: int, fn: Callable[..., Any], *args: Any) -> float:
    fn(*args)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def read_bandwidth_gbs(threads: int, nbytes: int, repeats: int) -> float:
    """Best-of read bandwidth: np.sum over per-thread slices of one big float32 array (GIL released)."""
    x = np.ones(nbytes // 4, dtype=np.float32)
    parts = np.array_split(x, threads)
    with ThreadPoolExecutor(threads) as pool:

        def run() -> None:
            list(pool.map(np.sum, parts))

        run()
        best = min(_timed(run) for _ in range(repeats))
    return x.nbytes / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def numpy_pipeline(x: np.ndarray, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """What one would write without kdpipe: einsum for sum_c x^2, then the norm, then the spatial mean."""
    if channel_axis == 1:
        a = np.einsum("nchw,nchw->nhw", x, x) / x.shape[1]
        pooled = x.mean(axis=(2, 3))
    else:
        a = np.einsum("nhwc,nhwc->nhw", x, x) / x.shape[3]
        pooled = x.mean(axis=(1, 2))
    norm = np.sqrt((a.reshape(len(a), -1) ** 2).sum(axis=1))
    return a / np.maximum(norm, 1e-12)[:, None, None], pooled


def bench_tap(
    shapes: list[tuple[int, int, int, int]], repeats: int, bandwidth: float
) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(0)
    for n, c, h, w in shapes:
        for layout, axis in (("NCHW", 1), ("NHWC", 3)):
            shape = (n, c, h, w) if axis == 1 else (n, h, w, c)
            x = rng.standard_normal(shape, dtype=np.float32)
            gb = x.nbytes / 1e9
            t_native = median_ms(repeats, ops.tap_targets, x, axis)
            t_numpy = median_ms(repeats, numpy_pipeline, x, axis)
            x16 = x.astype(np.float16)
            t_half = median_ms(repeats, ops.tap_targets, x16, axis)
            rows.append(
                {
                    "shape": list(shape),
                    "layout": layout,
                    "mib": x.nbytes / 2**20,
                    "native_ms": t_native,
                    "numpy_ms": t_numpy,
                    "native_gbs": gb / (t_native / 1e3),
                    "numpy_gbs": gb / (t_numpy / 1e3),
                    "speedup_vs_numpy": t_numpy / t_native,
                    "fraction_of_read_bandwidth": gb / (t_native / 1e3) / bandwidth,
                    "native_float16_ms": t_half,
                }
            )
    return rows


def bench_dct(repeats: int) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(1)
    for shape in ((256, 32, 32), (64, 56, 56), (256, 8, 8)):
        maps = rng.random(shape, dtype=np.float32)
        for variant in ops.DCT_VARIANTS:
            t_native = median_ms(repeats, ops.dct_targets, maps, variant)
            t_numpy = median_ms(repeats, ops.dct_targets_numpy, maps, variant)
            rows.append(
                {"shape": list(shape), "variant": variant, "native_ms": t_native, "numpy_ms": t_numpy}
            )
    return rows


def bench_storage(repeats: int) -> list[dict[str, Any]]:
    x = np.random.default_rng(2).standard_normal(16 * 2**20, dtype=np.float32)
    rows = []
    for dtype in ("float16", "bfloat16"):
        t_native = median_ms(repeats, ops.to_storage, x, dtype)
        t_numpy = median_ms(repeats, ops.to_storage_numpy, x, dtype)
        rows.append({"elements": x.size, "dtype": dtype, "native_ms": t_native, "numpy_ms": t_numpy})
    return rows


def bench_normalize(repeats: int, quick: bool) -> list[dict[str, Any]]:
    """Teacher preprocessing of uint8 NHWC images to float32 NCHW (ImageNet mean/std), one thread: the
    native gather behind ``Normalize`` vs the same lookup table applied with NumPy fancy indexing."""
    from kdpipe.data.preprocess import Normalize

    norm = Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    lut = norm._lut(np.arange(256, dtype=np.float32))

    def numpy_lut(images: np.ndarray) -> np.ndarray:
        out = np.empty((images.shape[0], 3, *images.shape[1:3]), np.float32)
        for c in range(3):
            out[:, c] = lut[c][images[..., c]]
        return out

    rows = []
    for shape in [(64, 32, 32, 3)] if quick else [(1024, 32, 32, 3), (64, 224, 224, 3)]:
        x = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
        assert numpy_lut(x).tobytes() == norm(x).tobytes()
        out = np.empty((shape[0], 3, *shape[1:3]), np.float32)
        t_native = median_ms(repeats, functools.partial(norm, x, threads=1, out=out))
        t_numpy = median_ms(repeats, numpy_lut, x)
        rows.append({"shape": list(shape), "native_ms": t_native, "numpy_ms": t_numpy})
    return rows


def bench_resize(repeats: int, quick: bool) -> list[dict[str, Any]]:
    """Random-resized-crop views (bilinear crop + resize + flip, ``kdpipe.data.transforms``), one thread:
    the native blend vs the NumPy gathers of the same formula (bit-identical outputs)."""
    from kdpipe.data.transforms import crop_resize_batch
    from kdpipe.data.views import ViewPolicy, draw_view_params

    rows = []
    for n, side, size in [(8, 64, 56)] if quick else [(64, 256, 224), (1024, 40, 32)]:
        x = np.random.default_rng(4).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
        policy = ViewPolicy(kind="rrc", size=size, flip=True)
        p = draw_view_params(policy, 0, np.arange(n), np.zeros(n, np.int64), np.full((n, 2), side))
        args = (x, *p.T, size)
        assert crop_resize_batch(*args).tobytes() == crop_resize_batch(*args, native=False).tobytes()
        t_native = median_ms(repeats, crop_resize_batch, *args)
        t_numpy = median_ms(repeats, functools.partial(crop_resize_batch, native=False), *args)
        rows.append({"images": [n, side, side, 3], "size": size, "native_ms": t_native, "numpy_ms": t_numpy})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not ops.native_available():
        raise SystemExit("kdpipe._native is not built: run `make build` first")
    threads = ops.num_threads()
    repeats = 3 if args.quick else args.repeats
    shapes = [(16, 64, 32, 32)] if args.quick else [(256, 64, 32, 32), (64, 256, 56, 56)]
    bandwidth = read_bandwidth_gbs(threads, (64 if args.quick else 1024) * 2**20, repeats)
    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "threads": threads,
            "read_bandwidth_gbs": bandwidth,
        },
        "tap_targets": bench_tap(shapes, repeats, bandwidth),
        "dct_targets": bench_dct(repeats),
        "to_storage": bench_storage(repeats),
        "normalize": bench_normalize(repeats, args.quick),
        "crop_resize": bench_resize(repeats, args.quick),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    size = "64 MiB" if args.quick else "1 GiB"
    print(f"threads {threads}, read bandwidth {bandwidth:.1f} GB/s (np.sum, {size}, best of {repeats})")
    print(f"{'tap_targets shape':<22}{'layout':<7}{'native ms':>10}{'GB/s':>7}{'numpy ms':>10}{'GB/s':>7}"
          f"{'speedup':>9}{'of bw':>7}{'fp16 ms':>9}")  # fmt: skip
    for r in result["tap_targets"]:
        shape = "x".join(map(str, r["shape"]))
        print(f"{shape:<22}{r['layout']:<7}{r['native_ms']:>10.2f}{r['native_gbs']:>7.1f}"
              f"{r['numpy_ms']:>10.2f}{r['numpy_gbs']:>7.1f}{r['speedup_vs_numpy']:>8.1f}x"
              f"{r['fraction_of_read_bandwidth']:>7.2f}{r['native_float16_ms']:>9.2f}")  # fmt: skip

    def native_vs_numpy(head: str, col: str, rows: list[dict[str, Any]], label: Any, extra: Any) -> None:
        print(f"{head:<22}{col:<9}{'native ms':>10}{'numpy ms':>10}")
        for r in rows:
            print(f"{label(r):<22}{extra(r):<9}{r['native_ms']:>10.2f}{r['numpy_ms']:>10.2f}")

    def dims(key: str) -> Any:
        return lambda r: "x".join(map(str, r[key]))

    native_vs_numpy(
        "dct_targets shape", "variant", result["dct_targets"], dims("shape"), lambda r: r["variant"]
    )
    native_vs_numpy(
        "to_storage elements", "dtype", result["to_storage"], lambda r: r["elements"], lambda r: r["dtype"]
    )
    native_vs_numpy("normalize, 1 thread", "", result["normalize"], dims("shape"), lambda r: "")
    native_vs_numpy("rrc views, 1 thread", "to", result["crop_resize"], dims("images"), lambda r: r["size"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
