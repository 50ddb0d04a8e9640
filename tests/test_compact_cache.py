"""Small caches (issue 13): DCT targets derived from the cached at maps, top-K logits, float16
pooled vectors, bytes per view and `cache-teacher --estimate`.

References are float64 NumPy formulas written here and the bytes of the files re-read from disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _distill import CLASSES, cached, distill_args, run_cli, run_ok, teacher, train_data

import kdpipe.cache as kc
from kdpipe.cache_teacher import top_k_logits
from kdpipe.losses.kd import kd_loss
from kdpipe.targets import dense_logits, plan_targets

SHARD = Path("shards") / "00000-of-00001"


def _dct_ref(maps: np.ndarray, variant: str) -> np.ndarray:
    """float64 DCT-driven target (López-Cifuentes et al.): centre, |Re FFT2|, per-sample (R-min)/max."""
    a = maps.astype(np.float64)
    r = np.fft.fft2(a - a.mean(axis=(1, 2), keepdims=True)).real
    r = np.abs(r) if variant == "dft-abs" else r
    r[:, 0, 0] = 0.0  # exactly 0 in exact arithmetic (sum of a centred map)
    lo, hi = r.min(axis=(1, 2), keepdims=True), r.max(axis=(1, 2), keepdims=True)
    return (r - lo) / (hi if variant == "dft-abs" else hi - lo)


def _all_rows(cache: kc.Cache, name: str) -> np.ndarray:
    n, v = len(cache), cache.num_views
    s, w = np.repeat(np.arange(n), v), np.tile(np.arange(v), n)
    return cache.gather(name, s, w)


# ------------------------------------------------------------------------------ derived DCT targets
def test_default_cache_stores_no_dct_and_distill_derives_it() -> None:
    plain = kc.open(cached(2, "float16", targets="logits,at,pooled"))
    assert not [a for a in plain.arrays if a.startswith("dct.")]
    with_dct = kc.open(cached(2, "float16"))
    ntaps = len(plain.taps)
    plan = plan_targets({"dct"}, ntaps, "dft-abs", set(plain.arrays))
    assert plan.read == [f"at.{i}" for i in range(ntaps)] and set(plan.derive) == {
        f"dct.dft-abs.{i}" for i in range(ntaps)
    }
    teacher_batch = {k: torch.from_numpy(_all_rows(plain, k)) for k in plan.read}
    derived = plan.complete(teacher_batch)
    for i in range(ntaps):
        at = _all_rows(plain, f"at.{i}")
        got = derived[f"dct.dft-abs.{i}"].numpy()
        # exact up to float32 arithmetic against the float64 formula on the same (float16) at map
        np.testing.assert_allclose(got, _dct_ref(at, "dft-abs"), atol=2e-6)
        # and close to the (float16) D that cache-teacher stores from the raw activations: the at map's
        # float16 rounding (2**-11 relative) moves D by up to ~3e-3 on this teacher's 4x4 maps
        stored = _all_rows(with_dct, f"dct.dft-abs.{i}")
        assert np.abs(got - stored).max() < 5e-3
    # a cache that stores D keeps using it
    old = plan_targets({"dct"}, ntaps, "dft-abs", set(with_dct.arrays))
    assert not old.derive and old.read == [f"dct.dft-abs.{i}" for i in range(ntaps)]


def test_dct_methods_train_from_a_cache_without_dct(tmp_path: Path) -> None:
    c = cached(2, "float16", targets="logits,at,pooled")
    for method in ("dct", "dct+kd"):
        r = run_ok(distill_args(tmp_path / method, "--method", method, "--no-export", "--max-steps", "2",
                                "--teacher-correct-mask", cache_path=c))  # fmt: skip
        assert "epoch 1" in r.stderr


# ------------------------------------------------------------------------------------ top-K logits
def test_top_k_logits_against_numpy() -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((50, 37)).astype(np.float32) * 3
    got = top_k_logits(z, 5)
    order = np.argsort(-z.astype(np.float64), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(got["logits.topk_index"], order)
    np.testing.assert_array_equal(got["logits.topk"], np.take_along_axis(z, order, 1))
    rest = np.array(
        [np.delete(row, idx).mean() for row, idx in zip(z.astype(np.float64), order, strict=True)]
    )
    np.testing.assert_allclose(got["logits.rest"][:, 0], rest, rtol=1e-6)
    dense = dense_logits(
        *(torch.from_numpy(got[k]) for k in ("logits.topk", "logits.topk_index", "logits.rest")), 37
    )
    for b in range(50):
        want = np.full(37, rest[b])
        want[order[b]] = z[b, order[b]]
        np.testing.assert_allclose(dense[b].numpy(), want, rtol=1e-6)
    # K = C rebuilds the logits exactly, so KD is exactly the full-logit KD
    full = top_k_logits(z, 37)
    dense = dense_logits(torch.from_numpy(full["logits.topk"]), torch.from_numpy(full["logits.topk_index"]),
                         torch.from_numpy(full["logits.rest"]), 37)  # fmt: skip
    s = torch.randn(50, 37)
    assert float(kd_loss(s, dense)) == float(kd_loss(s, torch.from_numpy(z)))


def test_cache_teacher_topk_logits_and_kd_from_them(tmp_path: Path) -> None:
    full = kc.open(cached(2, "float32"))
    out = tmp_path / "topk"
    run_ok(["cache-teacher", teacher(), "--data", train_data(), "--out", str(out), "--views", "2",
            "--logits", "topk:2", "--threads", "1", "--no-progress"])  # fmt: skip
    c = kc.open(out)
    assert "logits" not in c.arrays
    assert c.arrays["logits.topk_index"].dtype == "int16" and c.arrays["logits.topk"].dtype == "float16"
    z = np.asarray(full.array("logits"), np.float64).reshape(-1, CLASSES)
    idx = np.asarray(c.array("logits.topk_index")).reshape(-1, 2)
    np.testing.assert_array_equal(idx, np.argsort(-z, axis=1, kind="stable")[:, :2])
    vals = np.asarray(c.array("logits.topk"), np.float64).reshape(-1, 2)
    np.testing.assert_allclose(vals, np.take_along_axis(z, idx, 1), rtol=1e-3, atol=1e-3)
    rest = np.asarray(c.array("logits.rest"), np.float64).reshape(-1)
    np.testing.assert_allclose(
        rest, (z.sum(1) - np.take_along_axis(z, idx, 1).sum(1)) / 2, rtol=2e-3, atol=2e-3
    )
    r = run_ok(
        distill_args(
            tmp_path / "run", "--method", "kd", "--no-export", "--max-steps", "2", cache_path=str(out)
        )
    )
    assert "epoch 1" in r.stderr
    bad = run_cli(["cache-teacher", teacher(), "--data", train_data(), "--out", str(tmp_path / "x"),
                   "--logits", "topk:9", "--no-progress"])  # fmt: skip
    assert bad.exit_code == 2 and "1 <= K <= 4" in bad.stderr


def test_pooled_vectors_default_to_float16_and_overflow_names_the_array(tmp_path: Path) -> None:
    out = tmp_path / "c"
    run_ok(
        [
            "cache-teacher",
            teacher(),
            "--data",
            train_data(),
            "--out",
            str(out),
            "--threads",
            "1",
            "--no-progress",
        ]
    )
    m = json.loads((out / "manifest.json").read_text())
    assert {m["arrays"][a]["dtype"] for a in m["arrays"] if a.startswith("pooled.")} == {"float16"}
    assert m["arrays"]["logits"]["dtype"] == "float32"  # few classes: full float32 logits
    assert not [a for a in m["arrays"] if a.startswith("dct.")]
    big = tmp_path / "big.npz"
    np.savez(big, x=np.full((8, 16, 16), 255, np.uint8), y=np.arange(8) % CLASSES)
    r = run_cli(["cache-teacher", teacher(), "--data", str(big), "--out", str(tmp_path / "o"),
                 "--scale", "1e6", "--no-progress"])  # fmt: skip
    if r.exit_code == 0:
        pytest.skip("this teacher's activations stayed inside float16 range even at scale 1e6")
    assert r.exit_code == 2 and "float32" in r.stderr and ("pooled." in r.stderr or "at." in r.stderr)


# --------------------------------------------------------------------------- bytes per view, estimate
def test_bytes_per_view_from_the_files_and_the_estimate(tmp_path: Path) -> None:
    c = kc.open(cached(2, "float16", targets="logits,at,pooled"))
    n, v = len(c), c.num_views
    data = per_sample = 0
    for f in (c.path / SHARD).glob("*.npy"):
        with open(f, "rb") as fh:
            np.lib.format.read_magic(fh)
            np.lib.format.read_array_header_1_0(fh)
            size = f.stat().st_size - fh.tell()  # the bytes after the .npy header
        data += size
        per_sample += size if f.name == "labels.npy" else 0
    info = kc.info(c.path, project=(1000, 8))
    assert info["bytes_per_view"] == pytest.approx(data / (n * v), abs=0.1)
    per_view = (data - per_sample) / (n * v)
    assert info["projected"]["bytes"] == pytest.approx(1000 * (8 * per_view + per_sample / n), rel=1e-9)
    r = run_ok(["cache", "info", str(c.path), "--project", "1000x8"])
    assert f"bytes_per_view: {info['bytes_per_view']}" in r.stdout
    r = run_ok(["cache-teacher", teacher(), "--data", train_data(), "--out", str(tmp_path / "e"),
                "--views", "2", "--dtype", "float16", "--vec-dtype", "float16", "--estimate"])  # fmt: skip
    assert f"{data / (n * v):,.0f} bytes per view" in r.stdout
    assert not (tmp_path / "e").exists()  # an estimate writes nothing


def test_resnet34_imagenet_cache_fits_12kb_per_view(tmp_path: Path) -> None:
    """The goal of issue 13: a 1000-class ResNet-34 at 224 px, default targets, <= 12 KB per view."""
    from _distill import export_quiet

    from kdpipe.student import create_model

    torch.manual_seed(0)
    model = create_model("resnet34", num_classes=1000, in_chans=3)
    onnx_path = export_quiet(model, torch.zeros(1, 3, 224, 224), tmp_path / "r34.onnx")
    data = tmp_path / "two.npz"
    np.savez(data, x=np.zeros((2, 256, 256, 3), np.uint8), y=np.array([0, 1]))
    r = run_ok(["cache-teacher", str(onnx_path), "--data", str(data), "--out", str(tmp_path / "c"),
                "--views", "4", "--estimate"])  # fmt: skip
    per_view = float(r.stdout.split(" bytes per view")[0].replace(",", ""))
    assert per_view <= 12_000, r.stdout
    # the parts, from the shapes: four float16 maps (56, 28, 14, 7 px), four float16 pooled vectors
    # (64 + 128 + 256 + 512), 100 float16 logits + int16 classes + the rest's mean, view parameters
    want = 2 * (56**2 + 28**2 + 14**2 + 7**2) + 2 * 960 + 100 * 4 + 2 + 20 + 8 / 4
    assert per_view == pytest.approx(want, abs=0.5), r.stdout


def _vm_flags(path: Path) -> list[set[str]]:
    """The VmFlags of this process's mappings of ``path`` (from the kernel's /proc/self/smaps)."""
    flags, current = [], False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if not line[:1].isspace() and "-" in line.split(" ", 1)[0] and ":" not in line.split(" ", 1)[0]:
            current = line.rstrip().endswith(str(path))
        elif current and line.startswith("VmFlags:"):
            flags.append(set(line.split()[1:]))
    return flags


def test_advise_random_reaches_the_kernel() -> None:
    if not Path("/proc/self/smaps").exists():
        pytest.skip("no /proc/self/smaps on this system")
    c = kc.open(cached(2, "float16", targets="logits,at,pooled"))
    c.gather("at.0", np.array([3, 1]), np.array([0, 1]))
    path = (c.path / SHARD / "at.0.npy").resolve()
    assert _vm_flags(path) and all("rr" not in f for f in _vm_flags(path))  # the kernel's default
    c.advise_random()
    assert all("rr" in f for f in _vm_flags(path))  # VM_RAND_READ: no readahead on faults
    c.gather("pooled.0", np.array([3]), np.array([0]))  # arrays opened later get it too
    assert all("rr" in f for f in _vm_flags((c.path / SHARD / "pooled.0.npy").resolve()))
