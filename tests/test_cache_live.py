"""`kdpipe cache verify PATH --live N`: the teacher re-run on random (sample, view) pairs of a real cache.

It passes on real caches (float32, float16, bfloat16 storage), and it fails where checksums cannot:
on a cache whose stored targets were altered consistently (written through the normal writer, so
every checksum is valid and the plain `cache verify` passes), and with another teacher file. The
reported difference is checked against the alteration the test made.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _distill import CLASSES, SIDE, cached, export_quiet, run_cli, val_data

import kdpipe.cache as kc
from kdpipe.cache import format as fmt

LOGITS_SHIFT = 0.05
AT_SCALE = 1.01


def kinds(stdout: str) -> dict[str, tuple[float, str]]:
    """kind -> (reported max |stored - live|, verdict word) from the report lines."""
    out = {}
    for m in re.finditer(r"^  (\w+)\s+max \|stored - live\| = (\S+) .*\)\s+(OK|BEYOND)", stdout, re.M):
        out[m.group(1)] = (float(m.group(2)), m.group(3))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_live_check_passes_on_a_real_cache(dtype):
    c = cached(views=2, dtype=dtype)
    r = run_cli(["cache", "verify", c, "--live", "40"])
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "on 40 random (sample, view) pair(s)" in r.stdout and r.stdout.strip().endswith("live OK")
    got = kinds(r.stdout)
    assert set(got) == {"logits", "at", "dct", "pooled"} and all(v == "OK" for _, v in got.values())
    if dtype == "float32":  # same session settings, same graph: the very same numbers
        assert all(d < 1e-5 for d, _ in got.values()), got


@pytest.fixture(scope="module")
def forged(tmp_path_factory):
    """A copy of a real float32 cache with logits + 0.05 and the at maps x 1.01, written through the
    normal writer: every checksum and seal is valid."""
    src = kc.open(cached(views=2, dtype="float32"))
    caller = {k: v for k, v in src.manifest.items() if k not in fmt.ADDED_KEYS}
    dst = tmp_path_factory.mktemp("forged") / "cache"
    with kc.create_or_resume(dst, caller, (0, 1)) as w:
        for c in w.pending_chunks():
            s0, s1 = w.chunk_range(c)
            arrays = {name: np.ascontiguousarray(src.array(name)[s0:s1]) for name in src.arrays}
            arrays["logits"] = arrays["logits"] + np.float32(LOGITS_SHIFT)
            for name in arrays:
                if name.startswith("at."):
                    arrays[name] = arrays[name] * np.float32(AT_SCALE)
            w.write_chunk(c, arrays)
        w.finish()
    return str(dst)


def test_consistent_alteration_passes_checksums_and_fails_live(forged):
    assert kc.verify(forged) == []
    r = run_cli(["cache", "verify", forged])
    assert r.exit_code == 0 and r.stdout.strip() == f"{forged}: OK"
    r = run_cli(["cache", "verify", forged, "--live", "30", "--seed", "3"])
    assert r.exit_code == 1, r.stdout
    got = kinds(r.stdout)
    assert got["logits"][1] == "BEYOND" and got["at"][1] == "BEYOND"
    assert got["dct"][1] == "OK" and got["pooled"][1] == "OK"  # not altered
    assert abs(got["logits"][0] - LOGITS_SHIFT) < 1e-5, got  # exactly the shift made above
    at_max = max(
        float(np.abs(kc.open(forged).array(n)[:]).max()) for n in kc.open(forged).arrays if n[:3] == "at."
    )
    assert 0 < got["at"][0] <= at_max * (1 - 1 / AT_SCALE) + 1e-6
    assert "do not match the teacher" in r.stderr


def test_another_teacher_file_fails(tmp_path):
    from kdpipe.student import create_model

    torch.manual_seed(5)  # the same architecture, other weights
    other = export_quiet(
        create_model("resnet8", num_classes=CLASSES, in_chans=1),
        torch.zeros(2, 1, SIDE, SIDE),
        tmp_path / "o.onnx",
    )
    r = run_cli(
        ["cache", "verify", cached(views=2, dtype="float16"), "--live", "20", "--teacher", str(other)]
    )
    assert r.exit_code == 1, r.stdout
    assert "WARNING: its sha256 differs from the one in the manifest" in r.stdout
    assert "BEYOND" in r.stdout


def test_live_mistakes_are_one_line(tmp_path):
    c = cached(views=2, dtype="float16")
    for args, msg in [
        (["--teacher", str(tmp_path / "nope.onnx")], "pass --teacher PATH"),
        (["--data", val_data()], "is not the one this cache was made from"),
    ]:
        r = run_cli(["cache", "verify", c, "--live", "5", *args])
        assert r.exit_code == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_live_check_on_default_targets_and_top_k_logits(tmp_path):
    """The default targets (no stored DCT) and top-K logits: the dense logits distill rebuilds from
    the stored top K are compared with those rebuilt from the teacher's live top K."""
    from _distill import teacher, train_data

    out = tmp_path / "topk"
    r = run_cli(["cache-teacher", teacher(), "--data", train_data(), "--out", str(out), "--views", "2",
                 "--logits", "topk:2", "--threads", "1", "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    r = run_cli(["cache", "verify", str(out), "--live", "24"])
    assert r.exit_code == 0, r.stdout + r.stderr
    got = kinds(r.stdout)
    assert set(got) == {"logits", "at", "pooled"} and all(v == "OK" for _, v in got.values()), got


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_live_check_recomputes_input_gradients(tmp_path, dtype):
    # J_T through the teacher's replica again, compared with the stored grad; then a consistently
    # forged grad (every checksum valid) fails live
    c = cached(views=2, dtype=dtype, targets="logits,at,grad")
    r = run_cli(["cache", "verify", c, "--live", "30"])
    assert r.exit_code == 0, r.stdout + r.stderr
    got = kinds(r.stdout)
    assert set(got) == {"logits", "at", "grad"} and all(v == "OK" for _, v in got.values()), got
    src = kc.open(c)
    dst = tmp_path / "forged"
    with kc.create_or_resume(
        dst, {k: v for k, v in src.manifest.items() if k not in fmt.ADDED_KEYS}, (0, 1)
    ) as w:
        for ch in w.pending_chunks():
            s0, s1 = w.chunk_range(ch)
            arrays = {name: np.ascontiguousarray(src.array(name)[s0:s1]) for name in src.arrays}
            arrays["grad"] = (arrays["grad"] * 1.05).astype(arrays["grad"].dtype)
            w.write_chunk(ch, arrays)
        w.finish()
    r = run_cli(["cache", "verify", str(dst), "--live", "30"])
    assert r.exit_code == 1, r.stdout + r.stderr
    got = kinds(r.stdout)
    assert got["grad"][1] == "BEYOND" and got["at"][1] == "OK" and got["logits"][1] == "OK", got
