"""Benchmark: what checking a cache's checksums costs distill, on a cache larger than the page cache.

A synthetic cache with the ImageNet-style layout of a ResNet-34 teacher (at maps 56/28/14/7 px in
float16, 1000 float32 logits, labels and view parameters; about 12.5 KB per view) is written, then
three ways of keeping damaged bytes away from the loss are timed in a child process whose memory
cgroup (v1 or v2, root only) is limited to ``--mem-gib``, so the page cache cannot hold the cache:

- ``full``: ``kdpipe.cache.verify`` of the arrays distill reads, once at start (what distill does);
- ``gather``: random batches of (sample, view) rows, as distill gathers them, with no check at all;
- ``lazy``: the same batches, each chunk's crc32 checked the first time a batch touches it;
- ``gather_random``: the gathers after ``Cache.advise_random()`` (``madvise(MADV_RANDOM)``: a page
  fault reads its page, not the kernel's readahead window).

Every measurement starts cold: the cache files' pages are dropped (``posix_fadvise DONTNEED``) first.
Gathers run for ``--batches`` batches; ``epoch_s`` extrapolates to one epoch. Writes
bench/results/verify.json.

Usage: ``python bench/verify.py [--gib 3] [--mem-gib 1] [--batches 300] [--dir /var/tmp]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

import kdpipe.cache as kc
from kdpipe.cache import format as fmt
from kdpipe.cache.verify import verify

RESULTS = Path(__file__).resolve().parent / "results" / "verify.json"
ARRAYS = {
    "at.0": [56, 56],
    "at.1": [28, 28],
    "at.2": [14, 14],
    "at.3": [7, 7],
}
CHUNK = 4096
MODES = ("full", "gather", "lazy", "gather_random", "gather", "gather_random", "full")


def manifest(num_samples: int, views: int) -> dict:
    arrays = {k: {"shape": v, "dtype": "float16", "per": "view"} for k, v in ARRAYS.items()}
    arrays["logits"] = {"shape": [1000], "dtype": "float32", "per": "view"}
    arrays["view_params"] = {"shape": [5], "dtype": "int32", "per": "view"}
    arrays["labels"] = {"shape": [], "dtype": "int64", "per": "sample"}
    return {"num_samples": num_samples, "num_views": views, "chunk_size": CHUNK, "arrays": arrays}


def build(root: Path, gib: float, views: int) -> kc.Cache:
    """Write (or reuse) a complete synthetic cache of about ``gib`` GiB."""
    m = manifest(1, views)
    per_sample = sum(fmt.parse_arrays(m["arrays"])[k].row_bytes(views) for k in m["arrays"])
    n = int(gib * 2**30 / per_sample) // CHUNK * CHUNK
    m = manifest(n, views)
    w = kc.create_or_resume(root, m)
    rng = np.random.default_rng(0)
    with w:
        for c in w.pending_chunks():
            s0, s1 = w.chunk_range(c)
            rows = s1 - s0
            arrays = {}
            for name, spec in w.layout.arrays.items():
                shape = (rows,) + spec.row_shape(views)
                if spec.dtype == "float16":
                    arrays[name] = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
                elif spec.dtype == "float32":
                    arrays[name] = rng.standard_normal(shape, dtype=np.float32)
                else:
                    arrays[name] = np.zeros(shape, dtype=spec.np_dtype)
            w.write_chunk(c, arrays)
        w.finish()
    return kc.open(root)


def drop_pages(root: Path) -> None:
    for p in root.rglob("*.npy"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def gather_run(cache: kc.Cache, names: list[str], batches: int, batch: int, lazy: bool, seed: int) -> float:
    """Seconds for ``batches`` random batches (other rows in every round: nothing is cached from an
    earlier one); with ``lazy``, each chunk is checked on first touch."""
    rng = np.random.default_rng(seed)
    lay = cache.layout
    journal = fmt.read_journal(cache.shards[0].dir / fmt.JOURNAL).done
    checked: set[int] = set()
    t0 = time.perf_counter()
    for _ in range(batches):
        s = rng.integers(0, len(cache), batch)
        v = rng.integers(0, cache.num_views, batch)
        if lazy:
            for c in sorted(set((s // lay.chunk_size).tolist()) - checked):
                s0, s1 = lay.chunk_range(c)
                for name in names:
                    raw = np.ascontiguousarray(cache.array(name)[s0:s1])
                    assert zlib.crc32(fmt.byte_view(raw)) == journal[c][name]
                checked.add(c)
        for name in names:
            cache.gather(name, s, v)
    return time.perf_counter() - t0


def child(root: Path, batches: int, batch: int) -> dict:
    cache = kc.open(root)
    names = list(cache.layout.arrays)
    nbytes = sum(cache.layout.data_bytes(n, 0) for n in names)
    out: dict = {"cache_bytes": nbytes, "samples": len(cache), "views": cache.num_views}
    steps_per_epoch = len(cache) * cache.num_views / batch
    for k, mode in enumerate(MODES):  # interleaved, machine drift
        del cache
        gc.collect()  # unmap the previous round's files, or their pages cannot be dropped
        drop_pages(root)
        cache = kc.open(root)
        if mode == "gather_random":
            cache.advise_random()
        if mode == "full":
            t0 = time.perf_counter()
            assert verify(root, names) == []
            t = time.perf_counter() - t0
            out.setdefault("full_s", []).append(t)
            out.setdefault("full_gb_s", []).append(nbytes / t / 1e9)
        else:
            t = gather_run(cache, names, batches, batch, lazy=mode == "lazy", seed=k)
            out.setdefault(f"{mode}_s", []).append(t)
            out.setdefault(f"{mode}_epoch_s", []).append(t / batches * steps_per_epoch)
        print(f"{mode}: {t:.1f} s", file=sys.stderr, flush=True)
    return out


def in_cgroup(limit: int) -> str | None:
    """Move this process into a fresh memory cgroup limited to ``limit`` bytes; its path or None."""
    for base, knob in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max")):
        if not os.access(base, os.W_OK) or not os.path.exists(os.path.join(base, knob)):
            continue
        path = os.path.join(base, f"kdpipe-bench-{os.getpid()}")
        try:
            os.makedirs(path, exist_ok=True)
            Path(path, knob).write_text(str(limit))
            Path(path, "cgroup.procs").write_text(str(os.getpid()))
            return path
        except OSError:
            continue
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=3.0, help="cache size")
    ap.add_argument("--mem-gib", type=float, default=1.0, help="memory cgroup limit of the reader")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dir", default=None, help="where the cache goes (default: a temp folder)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    if a.child:
        cg = in_cgroup(int(a.mem_gib * 2**30))
        res = child(Path(a.child), a.batches, a.batch)
        res["cgroup"] = cg
        print(json.dumps(res))
        return
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        root = Path(tmp) / "cache"
        t0 = time.perf_counter()
        build(root, a.gib, a.views)
        build_s = time.perf_counter() - t0
        cmd = [sys.executable, __file__, "--child", str(root), "--mem-gib", str(a.mem_gib)]
        cmd += ["--batches", str(a.batches), "--batch", str(a.batch)]
        res = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)
        if res["cgroup"]:
            os.rmdir(res["cgroup"])  # empty once the child has exited
    res.update(
        build_s=build_s, mem_limit_gib=a.mem_gib, batch=a.batch, batches=a.batches, host=platform.node()
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    gb = res["cache_bytes"] / 1e9
    print(
        f"cache {gb:.2f} GB ({res['samples']} samples x {res['views']} views), reader limited to "
        f"{a.mem_gib} GiB (cgroup: {res['cgroup']})"
    )
    med = {k: float(np.median(v)) for k, v in res.items() if isinstance(v, list)}
    print(f"full verify at start: {med['full_s']:.1f} s ({med['full_gb_s']:.2f} GB/s)")
    print(f"one epoch of gathers, no check: {med['gather_epoch_s']:.0f} s (from {a.batches} batches)")
    print(f"one epoch of gathers, lazy per-chunk check: {med['lazy_epoch_s']:.0f} s")
    print(f"full verify / epoch of gathers: {med['full_s'] / med['gather_epoch_s']:.1%}")
    print(f"one epoch of gathers, MADV_RANDOM: {med['gather_random_epoch_s']:.0f} s")


if __name__ == "__main__":
    main()
