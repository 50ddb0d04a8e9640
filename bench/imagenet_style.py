"""Benchmark at ImageNet scale per image: a ResNet-34 teacher (1000 classes, 224 px) on real JPEG photos.

The photos are made at benchmark time from the two photos scikit-learn ships (``china.jpg``,
``flower.jpg``, 427x640): random crops of 240-427 x 240-640 px, re-encoded as JPEG (quality 90) into
8 class folders. The teacher is kdpipe's zoo ``resnet34`` with random weights (BN statistics spread so
activations are not trivial), exported by torch (legacy exporter, opset 17, dynamic batch), with an
ImageNet teacher card. ``--views 4 --augment rrc`` throughout. Reported (interleaved rounds: this
machine drifts 10-20 % over minutes):

- **cache-teacher against plain onnxruntime**: ``kdpipe.cache_teacher`` end to end on the folder
  (decode, random-resized-crop views, preprocessing, the teacher with its taps and targets, storage
  conversion, journaled writes) against an onnxruntime session of the unmodified teacher computing
  logits only, fed the *same* views decoded and preprocessed in advance (decode time not counted);
  same batch and threads. Both as views per second; the ratio per round is plain / cache-teacher.
  ``steady`` leaves out the first chunk (session creation, warm-up), as in bench/cache_teacher.py.
- **bytes per view** of the default cache (``kdpipe cache info``'s figure) and its projection to
  1.28 M images x 8 views.
- **distill** of a ResNet-18 student from that cache, batch 32: ``ce`` (no teacher), cached
  ``at+kd``, ``dct+kd`` (D derived from the cached at maps) and ``afd+kd``; the median interval
  between steps after a warm-up epoch, per round, and each method's ratio to ``ce`` within a round.

Usage: ``python bench/imagenet_style.py [--images 192] [--rounds 3] [--threads 2] [--quick]``.
Writes bench/results/imagenet_style.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "imagenet_style.json"
CARD = "input_size: [224, 224]\nscale: 1/255\nmean: [0.485, 0.456, 0.406]\nstd: [0.229, 0.224, 0.225]\n"
METHODS = ("ce", "at+kd", "dct+kd", "afd+kd")
VIEWS = 4


def make_photos(folder: Path, n: int, classes: int = 8, seed: int = 0) -> None:
    """``n`` JPEG crops of scikit-learn's sample photos, of varying sizes, in ``classes`` folders."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two uint8 (427, 640, 3)
    rng = np.random.default_rng(seed)
    for i in range(n):
        src = photos[i % len(photos)]
        h, w = int(rng.integers(240, 428)), int(rng.integers(240, 641))
        y, x = int(rng.integers(0, src.shape[0] - h + 1)), int(rng.integers(0, src.shape[1] - w + 1))
        crop = src[y : y + h, x : x + w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        d = folder / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(crop)).save(d / f"img{i:05d}.jpg", quality=90)


def export_teacher(path: Path) -> None:
    """The zoo's ResNet-34, 1000 classes, 224 px, random weights, as a self-contained ONNX file."""
    from _util import export_zoo

    export_zoo("resnet34", path, num_classes=1000, side=224)


def cache_job(work: Path, out: Path, args: argparse.Namespace) -> Any:
    from kdpipe.cache_teacher import CacheJob

    return CacheJob(
        teacher=str(work / "teacher.onnx"), card=str(work / "teacher.yaml"), data=str(work / "photos"),
        out=str(out), views=VIEWS, augment="rrc", batch_size=args.batch, threads=args.threads,
        chunk_size=args.chunk, provider="cpu", progress=False,
    )  # fmt: skip


def run_cache(work: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """One cache-teacher job from scratch: views/s end to end and after the first chunk."""
    import shutil

    import kdpipe.cache_teacher as ct

    shutil.rmtree(out, ignore_errors=True)
    starts: list[float] = []
    orig = ct._run_batches

    def timed(*a: Any, **k: Any) -> Any:
        starts.append(time.perf_counter())
        return orig(*a, **k)

    ct._run_batches = timed
    t0 = time.perf_counter()
    try:
        s = ct.cache_teacher(cache_job(work, out, args), log=lambda _m: None)
    finally:
        ct._run_batches = orig
    end = time.perf_counter()
    items = args.images * VIEWS
    assert s["complete"] and len(starts) >= 2
    return {"views_s": items / (end - t0), "steady_views_s": (items - args.chunk * VIEWS) / (end - starts[1])}


def prepared_views(work: Path, cache: Path) -> np.ndarray:
    """The cached views' teacher inputs, float32 (N*V, 3, 224, 224), decoded as cache-teacher did."""
    import kdpipe.cache as kc
    from kdpipe.data import load_dataset
    from kdpipe.data.views import ViewPolicy, apply_views
    from kdpipe.teacher.spec import TeacherSpec

    c = kc.open(cache)
    ds = load_dataset(str(work / "photos"))
    policy = ViewPolicy.from_dict(c.manifest["views"]["policy"])
    spec = TeacherSpec.from_dict(c.manifest["teacher"]["spec"])
    n = len(c)
    images = ds.load(np.arange(n, dtype=np.int64))
    params = np.asarray(c.view_params[:], dtype=np.int32).reshape(n * VIEWS, -1)
    u8 = apply_views([images[i // VIEWS] for i in range(n * VIEWS)], params, policy)
    return spec.preprocess(u8)


def run_plain(work: Path, x: np.ndarray, args: argparse.Namespace) -> float:
    """Views/s of an onnxruntime session computing the logits of ``x`` (a warm session)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(work / "teacher.onnx"), so, providers=["CPUExecutionProvider"])
    sess.run(None, {"image": x[: args.batch]})
    t0 = time.perf_counter()
    for b in range(0, len(x), args.batch):
        sess.run(["logits"], {"image": x[b : b + args.batch]})
    return len(x) / (time.perf_counter() - t0)


def run_distill(work: Path, cache: Path, method: str, tag: str, args: argparse.Namespace) -> float:
    """Median ms between steps of a ResNet-18 student after the warm-up epoch."""
    from kdpipe.train import DistillConfig, distill

    out = work / "runs" / tag
    cfg = DistillConfig(
        data=str(work / "photos"), out=str(out), student="resnet18", method=method, cache=str(cache),
        epochs=args.epochs, batch_size=args.student_batch, lr=0.05, workers=2, device="cpu",
        threads=args.threads, export_onnx=False, progress=False, tensorboard=False,
    )  # fmt: skip
    os.environ["KDPIPE_LOG_STEPS"] = "1"
    distill(cfg, log=lambda _m: None)
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines() if x.strip()]
    pairs = zip(steps, steps[1:], strict=False)
    gaps = [b["seconds"] - a["seconds"] for a, b in pairs if a["epoch"] == b["epoch"] >= 1]
    return 1e3 * statistics.median(gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--chunk", type=int, default=48, help="samples per cache chunk")
    ap.add_argument("--batch", type=int, default=64, help="teacher batch (both paths)")
    ap.add_argument("--student-batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3, help="distill epochs per run; the first is a warm-up")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke mode: 64 images, 1 round, student batch 16")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.images, args.chunk, args.rounds, args.epochs, args.student_batch = 64, 16, 1, 2, 16
    import kdpipe.cache as kc

    res: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "host": platform.node(),
                           "cpus": os.cpu_count(), "rounds": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kdpipe-imagenet-") as tmp:
        work = Path(tmp)
        make_photos(work / "photos", args.images)
        export_teacher(work / "teacher.onnx")
        (work / "teacher.yaml").write_text(CARD)
        cache = work / "cache"
        run_cache(work, cache, args)  # the cache distill reads, and a warm-up of the whole path
        info = kc.info(cache)
        res["bytes_per_view"] = info["bytes_per_view"]
        res["projected"] = info.get("projected")
        x = prepared_views(work, cache)
        for r in range(args.rounds):
            rd: dict[str, Any] = {}
            first, second = ("plain", "cache") if r % 2 == 0 else ("cache", "plain")
            for side in (first, second):
                rd[side] = run_plain(work, x, args) if side == "plain" else run_cache(work, work / "c2", args)
            rd["ratio"] = rd["plain"] / rd["cache"]["views_s"]
            rd["ratio_steady"] = rd["plain"] / rd["cache"]["steady_views_s"]
            order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
            tags = {m: f"{m}-{r}".replace("+", "_") for m in order}
            rd["distill_ms"] = {m: run_distill(work, cache, m, tags[m], args) for m in order}
            rd["distill_vs_ce"] = {m: rd["distill_ms"][m] / rd["distill_ms"]["ce"] for m in METHODS}
            res["rounds"].append(rd)
            print(json.dumps(rd), flush=True)
    med = statistics.median
    res["summary"] = {
        "cache_over_plain": med(rd["ratio"] for rd in res["rounds"]),
        "cache_over_plain_steady": med(rd["ratio_steady"] for rd in res["rounds"]),
        "plain_views_s": med(rd["plain"] for rd in res["rounds"]),
        "cache_views_s": med(rd["cache"]["views_s"] for rd in res["rounds"]),
        "distill_vs_ce": {m: med(rd["distill_vs_ce"][m] for rd in res["rounds"]) for m in METHODS},
        "distill_ms": {m: med(rd["distill_ms"][m] for rd in res["rounds"]) for m in METHODS},
        "load_average_end": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    s = res["summary"]
    print(f"bytes per view {res['bytes_per_view']}; cache-teacher {s['cache_views_s']:.1f} views/s, plain "
          f"onnxruntime {s['plain_views_s']:.1f} views/s: x{s['cache_over_plain']:.3f} "
          f"(steady x{s['cache_over_plain_steady']:.3f})")  # fmt: skip
    for m in METHODS:
        print(f"distill {m:<7} {s['distill_ms'][m]:8.1f} ms/step  x{s['distill_vs_ce'][m]:.3f} of ce")


if __name__ == "__main__":
    main()
