"""CNN students of a ViT teacher (and ViT students): the pairing of student stages with teacher blocks,
cached == online per step, AFD across families, and the zoo's ``vit_tiny``.

The teacher is the tiny ViT of ``tests/_vit.py`` (6 blocks, class token, 8x8 patch grid on 32x32 RGB);
the data are 64 random 32x32 RGB images with a learnable label (``_distill.make_npz``).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import _distill as D
import _vit as V
import numpy as np
import pytest
from test_distill_equivalence import STEPS, _losses

N, BATCH = 64, 16  # 4 steps an epoch


@cache
def rgb_data() -> str:
    return str(D.make_npz(D._DIR / "rgb32.npz", N, seed=0, side=32, channels=3))


@cache
def vit_cache(views: int = 2) -> str:
    """A float32 cache of the ViT teacher over rgb_data(), DCT stored (as the online teacher makes it)
    and the class-token attention."""
    out = D._DIR / f"vit-cache-{views}"
    D.run_ok(["cache-teacher", V.export("legacy"), "--data", rgb_data(), "--out", str(out), "--views",
              str(views), "--dtype", "float32", "--vec-dtype", "float32", "--threads", "1", "--no-progress",
              "--targets", "logits,at,dct,pooled,attn"])  # fmt: skip
    return str(out)


def _args(out: Path, *extra: str, student: str = "resnet8", data: str | None = None) -> list[str]:
    return ["distill", "--data", data or rgb_data(), "--student", student, "--out", str(out), "--epochs", "2",
            "--batch-size", str(BATCH), "--workers", "0", "--threads", "1", "--no-progress", "--seed", "3",
            "--lr", "0.05", *extra]  # fmt: skip


def _pairs(stderr: str) -> list[str]:
    return [line.strip() for line in stderr.splitlines() if line.strip().startswith("pair student")]


@pytest.mark.parametrize("method", ["at+kd", "dct", "afd+kd"])
def test_cached_equals_online_for_a_cnn_student_of_a_vit(tmp_path, method):
    common = ["--method", method, "--no-export"]
    a = D.run_ok(_args(tmp_path / "c", "--cache", vit_cache(), *common), STEPS)
    b = D.run_ok(
        _args(tmp_path / "o", "--online-teacher", V.export("legacy"), "--views", "2", *common), STEPS
    )
    got, want = _losses(tmp_path / "c"), _losses(tmp_path / "o")
    assert set(got) == set(want) and "loss" in got
    for term in got:
        np.testing.assert_allclose(got[term], want[term], rtol=1e-5, atol=1e-7, err_msg=term)
    assert np.all(np.isfinite(got["loss"]))
    if method == "afd+kd":  # AFD learns the pairing: every teacher block attends over every stage
        assert "each of 6 teacher tap(s) attends over all 3 student tap(s)" in a.stderr
    else:  # evenly spaced blocks ending at the last, printed at start; the same online
        assert _pairs(a.stderr) == [
            f"pair student layer{s} ({r}, {r}) <- teacher tap {t} (block {t + 1}) (8, 8)"
            for s, r, t in ((1, 32, 1), (2, 16, 3), (3, 8, 5))
        ]
        assert _pairs(b.stderr) == _pairs(a.stderr)


def test_teacher_taps_override_the_pairing(tmp_path):
    r = D.run_ok(_args(tmp_path / "a", "--cache", vit_cache(), "--method", "at", "--teacher-taps",
                       "blocks:1,2,3", "--no-export", "--max-steps", "1"))  # fmt: skip
    assert [p.split("<- ")[1] for p in _pairs(r.stderr)] == [
        f"teacher tap {t} (block {t + 1}) (8, 8)" for t in (0, 1, 2)
    ]
    r = D.run_ok(_args(tmp_path / "b", "--cache", vit_cache(), "--method", "at", "--teacher-taps", "5,0,3",
                       "--student-taps", "layer3,layer2", "--no-export", "--max-steps", "1"))  # fmt: skip
    # 2 of the 3 chosen taps (5, 0, 3), evenly spaced and ending at the last: 0 and 3
    assert [p.split("<- ")[1] for p in _pairs(r.stderr)] == ["teacher tap 0 (block 1) (8, 8)",
                                                             "teacher tap 3 (block 4) (8, 8)"]  # fmt: skip
    for bad, words in (("blocks:9", "numbered 1..6"), ("nothing", "is not a tap of")):
        r = D.run_cli(_args(tmp_path / bad, "--cache", vit_cache(), "--method", "at", "--teacher-taps", bad))
        assert r.exit_code == 2 and words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_vit_student_from_vit_and_cnn_teachers(tmp_path):
    small = ["--student-arg", "depth=4", "--student-arg", "dim=16", "--student-arg", "heads=2"]
    r = D.run_ok(_args(tmp_path / "vv", "--cache", vit_cache(), "--method", "at+kd", *small,
                       "--max-steps", "3", student="vit_tiny"))  # fmt: skip
    assert _pairs(r.stderr) == [f"pair student grids.{s} (8, 8) <- teacher tap {t} (block {t + 1}) (8, 8)"
                                for s, t in ((0, 1), (2, 3), (3, 5))]  # fmt: skip
    assert "onnx_max_abs_diff" in r.stderr  # the ViT student exports to ONNX
    # CNN -> ViT: the resnet8 teacher of the distill tests (grey 16x16, stages 16/8/4), patch 4 -> 4x4 grid
    cnn = D.cached(2, "float32")
    args = ["--cache", cnn, "--method", "at+kd", *small, "--student-arg", "img_size=16", "--max-steps", "3"]
    r = D.run_ok(_args(tmp_path / "cv", *args, "--no-export", student="vit_tiny", data=D.train_data()))
    assert _pairs(r.stderr) == [
        f"pair student grids.{s} (4, 4) <- teacher tap {t} ({r_}, {r_})"
        for s, t, r_ in ((0, 0, 16), (2, 1, 8), (3, 2, 4))
    ]
    assert "loss" in r.stderr


def test_show_maps_puts_student_maps_under_their_blocks(tmp_path):
    run = tmp_path / "run"
    D.run_ok(_args(run, "--cache", vit_cache(), "--method", "at+kd", "--max-steps", "2", "--no-export"))
    png = tmp_path / "maps.png"
    r = D.run_ok(["show-maps", vit_cache(), "--sample", "1", "--run", str(run), "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", r.stdout
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["paired_teacher_taps"] == [1, 3, 5] and cfg["paired_student_taps"] == [
        "layer1",
        "layer2",
        "layer3",
    ]
