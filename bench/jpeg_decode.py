"""Benchmark: JPEG decoders for folder datasets, Pillow against libjpeg-turbo bindings.

The photos are bench/imagenet_style.py's (random crops of scikit-learn's two sample photos, 240-427 x
240-640 px, JPEG quality 90). Timed per image, in interleaved rounds, one thread:

- ``pillow``: what kdpipe's FolderDataset does (``Image.open``, ``convert("RGB")``, ``np.asarray``);
- ``simplejpeg``: ``simplejpeg.decode_jpeg`` (libjpeg-turbo, accurate DCT, fancy upsampling);
- ``turbojpeg``: PyTurboJPEG's ``TurboJPEG.decode`` (the system libjpeg-turbo; only if installed);
- ``pillow_draft2`` / ``simplejpeg_half``: DCT-domain downscaling by 2 (``Image.draft``, ``min_height``
  and ``min_width`` of half the size): fewer pixels, different pixels.

Also reported: whether each full decoder gives the same pixels as Pillow (the teacher and the student
must see the same pixels), the share of kdpipe's teacher-side view preparation (decode + 4
random-resized-crop views at 224 px) that decoding takes, and the share of such views whose crop is
at least twice the output size on both sides (the only views a decode at half size could serve
without upsampling). Writes bench/results/jpeg_decode.json.

Usage: ``python bench/jpeg_decode.py [--images 96] [--rounds 5]`` (simplejpeg and PyTurboJPEG<2 are
optional: ``pip install simplejpeg "PyTurboJPEG<2"`` plus the system's libturbojpeg).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _util import sibling
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results" / "jpeg_decode.json"


def decoders() -> dict[str, Callable[[bytes], np.ndarray]]:
    def pillow(b: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(b)) as im:
            return np.asarray(im.convert("RGB"))

    def pillow_draft2(b: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(b)) as im:
            im.draft("RGB", (im.size[0] // 2, im.size[1] // 2))
            return np.asarray(im.convert("RGB"))

    out: dict[str, Callable[[bytes], np.ndarray]] = {"pillow": pillow, "pillow_draft2": pillow_draft2}
    try:
        import simplejpeg

        out["simplejpeg"] = lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB")

        def half(b: bytes) -> np.ndarray:
            h, w, _, _ = simplejpeg.decode_jpeg_header(b)
            return simplejpeg.decode_jpeg(b, colorspace="RGB", min_height=h // 2, min_width=w // 2)

        out["simplejpeg_half"] = half
    except ImportError:
        pass
    try:
        import turbojpeg

        tj = turbojpeg.TurboJPEG()
        out["turbojpeg"] = lambda b: tj.decode(b, pixel_format=turbojpeg.TJPF_RGB)
    except (ImportError, RuntimeError, OSError):
        pass
    return out


def views_share(files: list[Path], rounds: int) -> dict[str, float]:
    """ms per image of kdpipe's decode and of its 4 RRC views at 224 px (the teacher side)."""
    from kdpipe.data.views import ViewPolicy, apply_views, draw_view_params

    policy = ViewPolicy(kind="rrc", size=224, flip=True)
    decode = decoders()["pillow"]
    blobs = [f.read_bytes() for f in files]
    dec, view = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        images = [decode(b) for b in blobs]
        t1 = time.perf_counter()
        n = len(images)
        rep = np.repeat(np.arange(n), 4)
        sizes = np.array([im.shape[:2] for im in images], dtype=np.int32)[rep]
        params = draw_view_params(policy, 0, rep, np.tile(np.arange(4), n), sizes)
        apply_views([images[i] for i in rep], params, policy)
        t2 = time.perf_counter()
        dec.append(t1 - t0)
        view.append(t2 - t1)
        big = (params[:, 2] >= 448) & (params[:, 3] >= 448)
    return {"decode_ms": 1e3 * statistics.median(dec) / n, "views_ms": 1e3 * statistics.median(view) / n,
            "views_servable_at_half": float(big.mean())}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    res: dict = {"host": platform.node(), "images": a.images}
    with tempfile.TemporaryDirectory() as tmp:
        sibling("imagenet_style").make_photos(Path(tmp), a.images)
        files = sorted(Path(tmp).rglob("*.jpg"))
        blobs = [f.read_bytes() for f in files]
        decs = decoders()
        ref = [decs["pillow"](b) for b in blobs]
        res["same_pixels_as_pillow"] = {
            k: all(np.array_equal(fn(b), r) for b, r in zip(blobs, ref, strict=True))
            for k, fn in decs.items()
            if "draft" not in k and "half" not in k
        }
        times: dict[str, list[float]] = {k: [] for k in decs}
        for r in range(a.rounds):
            names = list(decs)[r % len(decs) :] + list(decs)[: r % len(decs)]
            for k in names:
                t0 = time.perf_counter()
                for b in blobs:
                    decs[k](b)
                times[k].append(1e3 * (time.perf_counter() - t0) / len(blobs))
        res["ms_per_image"] = {k: statistics.median(v) for k, v in times.items()}
        res["ms_per_image_rounds"] = times
        res["teacher_side"] = views_share(files, a.rounds)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    base = res["ms_per_image"]["pillow"]
    for k, v in res["ms_per_image"].items():
        same = res["same_pixels_as_pillow"].get(k, "n/a (other size)")
        print(f"{k:<16} {v:6.2f} ms/image  x{base / v:.2f} of pillow  same pixels: {same}")
    t = res["teacher_side"]
    print(f"kdpipe teacher side per image: decode {t['decode_ms']:.2f} ms + 4 RRC views "
          f"{t['views_ms']:.2f} ms; "
          f"views a half-size decode could serve: {100 * t['views_servable_at_half']:.0f} %")  # fmt: skip


if __name__ == "__main__":
    main()
