"""Folder caches record what decoded their images; distill refuses to replay other pixels.

The record (manifest ``dataset.decoder``) holds the sha256 of the first files' decoded pixels, checked
here against Pillow called directly. A probe file rewritten in place with other pixels but the same
byte size passes the dataset fingerprint (paths and sizes) and must still be refused, in one line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from _distill import distill_args, run_cli, run_ok, teacher
from PIL import Image


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 255, (16, 16), dtype=np.uint8)
            if i % 2:  # JPEG and uncompressed PNG (a PNG's size then depends on its dimensions only)
                Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.jpg", quality=90)
            else:
                Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png", compress_level=0)
    return root


def test_decoder_record_and_pixels_changed_in_place(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    run_ok(["cache-teacher", teacher(), "--data", str(root), "--out", str(tmp_path / "c"),
            "--views", "2", "--threads", "1", "--no-progress"])  # fmt: skip
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    rec = m["dataset"]["decoder"]
    assert rec["decoder"] == "pillow" and rec["probe_files"] == ["class0/0.png", "class0/1.jpg",
                                                                  "class0/2.png", "class0/3.jpg"]  # fmt: skip
    h = hashlib.sha256()
    for rel in rec["probe_files"]:
        with Image.open(root / rel) as im:
            arr = np.asarray(im.convert("L"))[:, :, None]
        h.update(f"{arr.shape}".encode())
        h.update(arr.tobytes())
    assert rec["pixels_sha256"] == h.hexdigest()
    assert set(m["run"]["decoder_versions"]) == {"pillow", "libjpeg_turbo"}

    args = distill_args(tmp_path / "run", "--data", str(root), "--method", "kd", "--no-export",
                        "--max-steps", "1", "--batch-size", "4", cache_path=str(tmp_path / "c"))  # fmt: skip
    run_ok(args)
    probe = root / "class0" / "2.png"
    size = probe.stat().st_size
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(probe, compress_level=0)
    assert probe.stat().st_size == size  # the dataset fingerprint cannot see this change
    args[args.index("--out") + 1] = str(tmp_path / "run2")
    r = run_cli(args)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.stderr
    assert "class0/0.png" in lines[0] and "other pixels" in lines[0] and "re-run cache-teacher" in lines[0]
    assert not (tmp_path / "run2" / "checkpoints" / "last.pt").exists()


def _load_in_child(ds: object, q: object) -> None:
    q.put(len(ds.load(np.arange(4))))  # type: ignore[attr-defined]


def test_folder_dataset_loads_in_a_forked_worker_after_the_parent_used_its_pool(tmp_path: Path) -> None:
    # a DataLoader worker is a fork of distill's process, which has used the decode pool already
    # (header scan, decoder check): the child must not wait on the parent's thread pool
    import multiprocessing as mp

    from kdpipe.data import load_dataset

    ds = load_dataset(str(_folder(tmp_path / "imgs")))
    ds.sizes()
    ds.load(np.arange(2))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_load_in_child, args=(ds, q))
    p.start()
    p.join(timeout=30)
    hung = p.is_alive()
    if hung:
        p.kill()
    assert not hung, "the forked worker hung on the parent's decode pool"
    assert q.get(timeout=5) == 4


def test_distill_with_worker_processes_on_an_image_folder(tmp_path: Path) -> None:
    from _distill import run_proc

    root = _folder(tmp_path / "imgs")
    run_ok(["cache-teacher", teacher(), "--data", str(root), "--out", str(tmp_path / "c"),
            "--views", "2", "--threads", "1", "--no-progress"])  # fmt: skip
    args = distill_args(tmp_path / "run", "--data", str(root), "--method", "kd", "--no-export",
                        "--max-steps", "2", "--batch-size", "4", cache_path=str(tmp_path / "c"))  # fmt: skip
    args[args.index("--workers") + 1] = "2"
    r = run_proc(args)  # a real process with a timeout: a hung worker fails instead of blocking
    assert r.returncode == 0, r.stderr
