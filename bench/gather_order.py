"""Benchmark: gathering training batches from a cache 3x larger than the memory the reader may use.

bench/verify.py's synthetic ImageNet-style cache (ResNet-34 taps: at maps 56/28/14/7 px float16, 1000
float32 logits, view parameters, labels; 4 views) is written with kdpipe's default chunk of
4096 / 4 = 1024 samples. A child process in a memory cgroup (root only) then gathers the batches
distill would gather, every array of the layout per batch, from cold pages, in three orders:

- ``random``: ``--order random`` (the default) after ``Cache.advise_random()``, as distill runs it;
- ``chunked``: ``--order chunked`` (default window: 256 MiB of rows) with its read-ahead: at the
  start of each window the next window's chunks are requested with ``posix_fadvise(WILLNEED)`` in a
  background thread, exactly as the loop's sampler does (``kdpipe.train.order``);
- ``chunked_no_ahead``: the same order without the read-ahead.

The modes are interleaved over ``--rounds`` rounds; each round drops the cache's pages first. Reported:
ms per batch and the extrapolated seconds per epoch (one view of every sample). Writes
bench/results/gather_order.json.

Usage: ``python bench/gather_order.py [--gib 3] [--mem-gib 1] [--batches 120] [--dir /var/tmp]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _util import sibling

import kdpipe.cache as kc
from kdpipe.batches import EpochKeys
from kdpipe.distributed import WorldInfo
from kdpipe.train.order import ReadAhead, epoch_keys, parse_order, read_ahead_plan

RESULTS = Path(__file__).resolve().parent / "results" / "gather_order.json"
MODES = ("random", "chunked", "chunked_no_ahead")


def run_mode(root: Path, mode: str, batches: int, batch: int, epoch: int) -> float:
    """Seconds for ``batches`` batches gathered in ``mode`` from cold pages."""
    cache = kc.open(root)
    cache.advise_random()
    names = list(cache.layout.arrays)
    names.remove("labels")
    world = WorldInfo(0, 0, 1)
    order = parse_order("random" if mode == "random" else "chunked", cache, names)
    keys = epoch_keys(0, epoch, len(cache), cache.num_views, batch, world, order)[:batches]
    sampler = EpochKeys()
    sampler.keys = keys
    if mode == "chunked":
        assert order is not None
        sampler.hints = ReadAhead(cache, names).hints(read_ahead_plan(keys, order, batch))
    t0 = time.perf_counter()
    for samples, views in sampler:
        for name in names:
            cache.gather(name, samples, views)
    return time.perf_counter() - t0


def child(root: Path, batches: int, batch: int, rounds: int) -> dict:
    verify = sibling("verify")
    out: dict = {}
    c = kc.open(root)
    out.update(samples=len(c), views=c.num_views, chunk=c.layout.chunk_size)
    names = [n for n in c.layout.arrays if n != "labels"]
    order = parse_order("chunked", c, names)
    assert order is not None
    out["window_chunks"] = order.window
    del c
    for r in range(rounds):
        for k, mode in enumerate(MODES[r % 3 :] + MODES[: r % 3]):
            gc.collect()
            verify.drop_pages(root)
            t = run_mode(root, mode, batches, batch, epoch=3 * r + k)
            out.setdefault(f"{mode}_s", []).append(t)
            print(f"round {r + 1} {mode}: {t:.1f} s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=3.0)
    ap.add_argument("--mem-gib", type=float, default=1.0)
    ap.add_argument("--batches", type=int, default=120)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    verify = sibling("verify")
    if a.child:
        cg = verify.in_cgroup(int(a.mem_gib * 2**30))
        res = child(Path(a.child), a.batches, a.batch, a.rounds)
        res["cgroup"] = cg
        print(json.dumps(res))
        return
    verify.CHUNK = 1024  # kdpipe's default for 4 views: about 4096 (sample, view) items per chunk
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        root = Path(tmp) / "cache"
        verify.build(root, a.gib, 4)
        cmd = [sys.executable, __file__, "--child", str(root), "--mem-gib", str(a.mem_gib),
               "--batches", str(a.batches), "--batch", str(a.batch), "--rounds", str(a.rounds)]  # fmt: skip
        res = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)
        if res["cgroup"]:
            Path(res["cgroup"]).rmdir()
        res["cache_bytes"] = sum(p.stat().st_size for p in root.rglob("*.npy"))
    steps = res["samples"] // a.batch
    for mode in MODES:
        med = statistics.median(res[f"{mode}_s"])
        res[f"{mode}_ms_per_batch"] = 1e3 * med / a.batches
        res[f"{mode}_epoch_s"] = med / a.batches * steps
    res.update(mem_limit_gib=a.mem_gib, batch=a.batch, batches=a.batches, host=platform.node())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    gb = res["cache_bytes"] / 1e9
    print(f"cache {gb:.2f} GB, {res['samples']} samples x {res['views']} views, chunk {res['chunk']}, "
          f"window {res['window_chunks']} chunks; reader limited to {a.mem_gib} GiB")  # fmt: skip
    for mode in MODES:
        per, ep = res[f"{mode}_ms_per_batch"], res[f"{mode}_epoch_s"]
        rounds = ", ".join(f"{t:.1f}" for t in res[f"{mode}_s"])
        print(f"{mode:<17} {per:8.1f} ms/batch  {ep:7.0f} s/epoch (rounds: {rounds} s)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
