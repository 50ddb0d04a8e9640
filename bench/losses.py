"""Benchmark of the feature losses alone: forward + backward on a student's tap activations.

The taps are WRN-16-1's three stage outputs at batch 128 ((128,16,32,32), (128,32,16,16),
(128,64,8,8), float32, CPU); the teacher targets are random float16 maps. Timed: ``at_loss`` and
``dct_loss`` (dft-abs), the teacher's D derived from its cached at maps (what distill adds per
step for a cache without stored DCT targets), and the attention map ``mean_c(F**2)`` per tap with
kdpipe's one-pass backward against autograd's own backward of ``(f * f).mean(1)``. Median of
``--repeats`` after 3 warm-ups, interleaved. Writes bench/results/losses.json and prints a table.

Usage: ``python bench/losses.py [--repeats 30]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kdpipe.losses import at_loss, dct_loss
from kdpipe.losses.common import channel_energy
from kdpipe.memory import keep_freed_memory
from kdpipe.targets import TargetPlan

RESULTS = Path(__file__).resolve().parent / "results" / "losses.json"
BATCH = 128
SHAPES = ((16, 32, 32), (32, 16, 16), (64, 8, 8))


def autograd_energy(f: torch.Tensor) -> torch.Tensor:
    """The plain formulation, for comparison: autograd differentiates both factors of f * f."""
    return (f * f).mean(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    keep_freed_memory()  # as in `kdpipe distill`
    torch.manual_seed(0)
    feats = [torch.randn(BATCH, *s) for s in SHAPES]
    maps = [torch.rand(BATCH, h, w).half() for _, h, w in SHAPES]

    def loss_case(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            fs = [f.clone().requires_grad_() for f in feats]
            fn(fs, maps).backward()

        return run

    def energy_case(i: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            f = feats[i].clone().requires_grad_()
            fn(f).sum().backward()

        return run

    plan = TargetPlan(
        read=[], derive={f"dct.dft-abs.{i}": (f"at.{i}", "dft-abs") for i in range(len(SHAPES))}
    )
    at_batch = {f"at.{i}": m.float() for i, m in enumerate(maps)}
    cases: dict[str, Callable[[], None]] = {
        "at_loss": loss_case(at_loss),
        "dct_loss": loss_case(dct_loss),
        "teacher D from at maps (derived)": lambda: plan.complete(at_batch) and None,
    }
    for i, (c, h, w) in enumerate(SHAPES):
        cases[f"energy {c}x{h}x{w} kdpipe"] = energy_case(i, channel_energy)
        cases[f"energy {c}x{h}x{w} autograd"] = energy_case(i, autograd_energy)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.repeats + 3):
        for key, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            if r >= 3:
                times[key].append(time.perf_counter() - t0)
    ms = {k: round(1e3 * statistics.median(v), 3) for k, v in times.items()}
    result = {
        "benchmark": "losses (forward + backward)",
        "batch": BATCH,
        "tap_shapes": SHAPES,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
        "platform": platform.platform(),
        "median_ms": ms,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in ms.items():
        print(f"{k:<32}{v:>9.2f} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
