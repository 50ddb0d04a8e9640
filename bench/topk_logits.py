"""How far KD's teacher distribution moves when the cache keeps only the top-K logits.

``cache-teacher --logits topk:K`` stores the K largest logits, their classes and the mean of the
other logits; distill rebuilds dense logits (the K values, the mean elsewhere). The KD gradient with
respect to the student's logits is ``T * (p_S - q) / B``, so the error this adds to every step is
``T * (q_rebuilt - q_full)``: its size is measured here, from real teacher logits read from a cache
with full logits, as the mean total-variation distance ``0.5 * sum |q_rebuilt - q_full|`` and the
mean ``KL(q_full || q_rebuilt)`` over all cached views, for several K and temperatures. The same is
done for "zero elsewhere" (the top-K renormalised), the other common choice.

Usage: ``python bench/topk_logits.py CACHE [CACHE ...] [--out bench/results/topk_logits.json]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import kdpipe.cache as kc
from kdpipe.cache_teacher import top_k_logits


def softmax(z: np.ndarray, t: float) -> np.ndarray:
    e = np.exp((z - z.max(1, keepdims=True)) / t)
    return e / e.sum(1, keepdims=True)


def distances(z: np.ndarray, k: int, t: float) -> dict[str, float]:
    """Mean TV and KL between the full teacher distribution and the two top-K rebuilds."""
    parts = top_k_logits(z.astype(np.float32), k)
    vals = parts["logits.topk"].astype(np.float16).astype(np.float64)  # as stored
    idx = parts["logits.topk_index"]
    rest = parts["logits.rest"].astype(np.float16).astype(np.float64)
    q = softmax(z.astype(np.float64), t)
    dense = np.repeat(rest, z.shape[1], axis=1)
    np.put_along_axis(dense, idx, vals, axis=1)
    zero = np.full_like(dense, -np.inf)
    np.put_along_axis(zero, idx, vals, axis=1)
    out = {}
    for name, rebuilt in (("rest_mean", softmax(dense, t)), ("zero_elsewhere", softmax(zero, t))):
        tv = 0.5 * np.abs(rebuilt - q).sum(1)
        with np.errstate(divide="ignore"):
            kl = (q * (np.log(q) - np.log(rebuilt))).sum(1)
        out[f"{name}_tv"] = float(tv.mean())
        out[f"{name}_kl"] = float(kl.mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("caches", nargs="+")
    ap.add_argument("--temperatures", default="1,4")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "topk_logits.json"))
    a = ap.parse_args()
    rows = []
    for path in a.caches:
        c = kc.open(path)
        z = np.asarray(c.array("logits"), dtype=np.float64).reshape(-1, c.arrays["logits"].shape[0])
        classes = z.shape[1]
        for t in (float(x) for x in a.temperatures.split(",")):
            for k in sorted({1, 2, 3, 5, max(1, classes // 10), max(1, classes // 2), classes - 1}):
                row = {"cache": path, "classes": classes, "views": len(z), "T": t, "K": k}
                rows.append(row | distances(z, k, t))
                print(
                    f"{Path(path).name} C={classes} T={t:g} K={k}: "
                    f"TV rest-mean {rows[-1]['rest_mean_tv']:.4f}"
                    f" zero {rows[-1]['zero_elsewhere_tv']:.4f}; KL rest-mean {rows[-1]['rest_mean_kl']:.5f}"
                    f" zero {rows[-1]['zero_elsewhere_kl']:.5f}"
                )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
