"""Non-finite teacher outputs and float16 overflow, with real ONNX teachers, the real CLI and processes.

Two tiny torch teachers exported to ONNX: one computes ``log(x[R at (0,0)] - 0.25)`` (NaN when that
pixel is below 0.25) and divides its logits by the green pixel at (0,0) (inf when it is 0); the other
multiplies its features by ``1 + 1e7 * x[B at (0,0)]`` (beyond the float16 range when that pixel is
255). Which samples must be reported is computed here with NumPy from the data (and, for the
overflow, from a float64 NumPy forward pass of the same weights), never from kdpipe.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from _distill import export_quiet
from click.testing import CliRunner

import kdpipe.cache as kc
from kdpipe.cli import cli
from kdpipe.errors import KdpipeError

N, K, SIZE, CHUNK = 40, 5, 8, 8
SHARD = Path("shards") / "00000-of-00001"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


class Teacher(nn.Module):
    """1x1-conv stem, one residual block (the auto tap), mean pool, linear head; ``mode`` adds the trap."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.c1 = nn.Conv2d(3, 4, 1)
        self.c2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))
        if self.mode == "nan":
            h = h + torch.log(x[:, 0:1, 0:1, 0:1] - 0.25)
        else:
            h = h * (1 + 1e7 * x[:, 2:3, 0:1, 0:1])
        r = h + torch.relu(self.c2(h))
        y = self.fc(r.mean((2, 3)))
        return y / x[:, 1:2, 0, 0] if self.mode == "nan" else y


def _export(mode: str, path: Path) -> tuple[str, Teacher]:
    torch.manual_seed(0)
    m = Teacher(mode).eval()
    return str(export_quiet(m, torch.rand(2, 3, SIZE, SIZE), path)), m


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("nonfinite")
    rng = np.random.default_rng(7)
    x = rng.integers(70, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
    nan_rows = np.sort(rng.choice(N, 6, replace=False))
    inf_rows = np.sort(rng.choice(N, 5, replace=False))
    big_rows = np.sort(rng.choice(np.arange(8, N), 7, replace=False))  # none in chunk 0
    x[nan_rows, 0, 0, 0] = rng.integers(0, 60, len(nan_rows))  # / 255 < 0.25: log of a negative
    x[inf_rows, 0, 0, 1] = 0  # division by zero
    x[:, 0, 0, 2] = 0
    x[big_rows, 0, 0, 2] = 255
    np.savez(d / "data.npz", x=x, y=np.arange(N) % K)
    nan_t, _ = _export("nan", d / "nan.onnx")
    big_t, big_m = _export("big", d / "big.onnx")
    return {"dir": d, "x": x, "nan": nan_t, "big": big_t, "big_model": big_m}


def _args(teacher: str, setup: dict, out: Path, *extra: str) -> list[str]:
    data = str(setup["dir"] / "data.npz")
    base = [teacher, "--data", data, "--out", str(out), "--chunk-size", str(CHUNK), "--threads", "1"]
    return ["cache-teacher", *base, "--no-progress", *extra]


def _expected_nonfinite(x: np.ndarray) -> dict[str, set[int]]:
    """Samples whose stored arrays must hold NaN/inf, from the pixels alone (float64)."""
    red, green = x[:, 0, 0, 0] / 255.0, x[:, 0, 0, 1]
    nan = set(np.flatnonzero(red - 0.25 < 0).tolist())
    return {"at.0": nan, "pooled.0": nan, "logits": nan | set(np.flatnonzero(green == 0).tolist())}


def _reported(line: str) -> tuple[int, list[int], dict[str, int]]:
    m = re.search(r"NaN/inf in (\d+) sample\(s\) \(first: ([0-9, .]+)\) in (.+?);", line)
    assert m is not None, line
    first = [int(t) for t in m.group(2).replace("...", "").split(",") if t.strip()]
    arrays = {k: int(v) for k, v in re.findall(r"([\w.-]+) \((\d+)\)", m.group(3))}
    return int(m.group(1)), first, arrays


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (out / SHARD).iterdir() if p.suffix in (".npy", ".jsonl")}


def test_nan_inf_reported_refused_then_allowed(setup, tmp_path):
    out = tmp_path / "c"
    want = _expected_nonfinite(setup["x"])
    union = sorted(set().union(*want.values()))
    # a real process: exit 2, one error line naming the samples and the flag, no traceback
    r = subprocess.run(
        [sys.executable, "-m", "kdpipe", *_args(setup["nan"], setup, out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("kdpipe: error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr and r.stdout == ""
    assert "--allow-nonfinite" in errors[0] and "NOT marked complete" in errors[0]
    count, first, arrays = _reported(errors[0])
    assert count == len(union) and first == union[:10]
    assert arrays == {k: len(v) for k, v in want.items()}
    # every chunk was written and journaled; only completion was refused
    assert not (out / SHARD / "COMPLETE.json").exists()
    assert len((out / SHARD / "journal.jsonl").read_bytes().splitlines()) == N // CHUNK
    with pytest.raises(KdpipeError, match="incomplete"):
        kc.open(out)
    assert kc.info(out)["complete"] is False
    before = _shard_bytes(out)

    again = CliRunner().invoke(cli, _args(setup["nan"], setup, out))  # same options: refused again
    assert again.exit_code == 2 and _reported(again.stderr.strip().splitlines()[-1])[0] == count
    assert _shard_bytes(out) == before

    ok = CliRunner().invoke(cli, _args(setup["nan"], setup, out, "--allow-nonfinite"))
    assert ok.exit_code == 0, ok.output
    assert "cached 0 item(s)" in ok.stdout and "complete: True" in ok.stdout  # nothing recomputed
    assert "accepted (--allow-nonfinite)" in ok.stderr
    assert _shard_bytes(out) == before
    c = kc.open(out)
    assert c.complete and c.verify() == []
    doc = json.loads((out / SHARD / "COMPLETE.json").read_text())
    assert doc["nonfinite"] == {
        "samples": len(union),
        "first": union[:10],
        "arrays": {k: len(v) for k, v in sorted(want.items())},
    }
    assert kc.info(out)["nonfinite"] == doc["nonfinite"] == c.nonfinite()  # cache info shows it
    info = CliRunner().invoke(cli, ["cache", "info", str(out)])
    assert info.exit_code == 0 and "nonfinite:\n  samples: " + str(len(union)) in info.output, info.output
    run = CliRunner().invoke(cli, ["distill", "--cache", str(out), "--data", str(setup["dir"] / "data.npz"),
                                   "--student", "resnet8", "--method", "kd", "--out", str(tmp_path / "run"),
                                   "--batch-size", "8", "--max-steps", "1", "--workers", "0",
                                   "--threads", "1", "--no-progress", "--no-export"])  # fmt: skip
    warned = [ln for ln in run.stderr.splitlines() if ln.startswith("WARNING:") and "--allow-nonfinite" in ln]
    assert len(warned) == 1 and f"NaN/inf in {len(union)} sample(s)" in warned[0], run.stderr
    for name in c.arrays:  # exactly the expected rows hold NaN/inf on disk
        a = np.load(out / SHARD / f"{name}.npy").astype(np.float64).reshape(N, -1)
        bad = set(np.flatnonzero(~np.isfinite(a).all(axis=1)).tolist())
        assert bad == want.get(name, set()), name

    # from scratch with the flag: the same bytes; a merge keeps the record
    direct = tmp_path / "direct"
    assert CliRunner().invoke(cli, _args(setup["nan"], setup, direct, "--allow-nonfinite")).exit_code == 0
    assert _shard_bytes(direct) == before
    merged = kc.merge(out, tmp_path / "merged")
    assert kc.verify(merged) == []
    assert json.loads((merged / SHARD / "COMPLETE.json").read_text())["nonfinite"] == doc["nonfinite"]


def _pooled_reference(model: Teacher, x_u8: np.ndarray) -> np.ndarray:
    """float64 NumPy forward of the 'big' teacher up to the pooled tap vector (N, 4)."""
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    x = x_u8.astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    w1, b1 = sd["c1.weight"][:, :, 0, 0], sd["c1.bias"]
    w2, b2 = sd["c2.weight"][:, :, 0, 0], sd["c2.bias"]
    h = np.maximum(np.einsum("oc,nchw->nohw", w1, x) + b1[:, None, None], 0)
    h = h * (1 + 1e7 * x[:, 2:3, 0:1, 0:1])
    r = h + np.maximum(np.einsum("oc,nchw->nohw", w2, h) + b2[:, None, None], 0)
    return r.mean(axis=(2, 3))


def test_float16_overflow_names_array_and_samples(setup, tmp_path):
    pooled = _pooled_reference(setup["big_model"], setup["x"])
    peak = np.abs(pooled).max(axis=1)
    assert not ((peak > 60000) & (peak < 70000)).any()  # no sample near the float16 limit (65520)
    over = np.flatnonzero(peak >= 65520)
    assert len(over) > 0
    chunk = over[0] // CHUNK  # the first chunk with an overflow stops the run
    expect = [int(s) for s in over if s // CHUNK == chunk]
    out = tmp_path / "c"
    args = _args(setup["big"], setup, out, "--targets", "at,pooled", "--vec-dtype", "float16")
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit))
    line = r.stderr.strip().splitlines()[-1]
    head = r"kdpipe: error: target pooled\.0 overflows float16 in (\d+) sample\(s\) \(([0-9, ]+);"
    m = re.match(head, line)
    assert m is not None, line
    assert [int(t) for t in m.group(2).split(",")] == expect and int(m.group(1)) == len(expect)
    assert "--vec-dtype float32" in line and "Traceback" not in r.output
    assert not (out / SHARD / "COMPLETE.json").exists()
    journal = (out / SHARD / "journal.jsonl").read_bytes().splitlines()
    assert sorted(json.loads(ln)["chunk"] for ln in journal) == list(range(chunk))

    # the advised fix: float32 pooled vectors, in a new folder (the old one is another configuration)
    f32 = ("--targets", "at,pooled", "--vec-dtype", "float32")
    refused = CliRunner().invoke(cli, _args(setup["big"], setup, out, *f32))
    assert refused.exit_code == 2 and "arrays/pooled.0/dtype" in refused.stderr
    fixed = tmp_path / "f32"
    ok = CliRunner().invoke(cli, _args(setup["big"], setup, fixed, *f32))
    assert ok.exit_code == 0, ok.output
    stored = np.load(fixed / SHARD / "pooled.0.npy")[:, 0]
    np.testing.assert_allclose(stored, pooled, rtol=1e-5, atol=1e-5)


def test_writer_journals_nonfinite_samples_and_refuses_to_finish(tmp_path):
    """The library level: the samples given to write_chunk are journaled, finish refuses without
    allow_nonfinite, a malformed (resealed) record makes its line invalid so the chunk is redone."""
    from test_cache_support import chunk_arrays, make_manifest

    from kdpipe.cache import format as fmt

    m = make_manifest(num_samples=12, num_views=2, chunk_size=4)
    root = tmp_path / "c"
    w = kc.create_or_resume(root, m)
    for c in w.pending_chunks():
        w.write_chunk(c, chunk_arrays(m, *w.chunk_range(c)), {"logits": [4 * c + 1]} if c != 1 else {})
    with pytest.raises(KdpipeError, match=r"NaN/inf in 2 sample\(s\) \(first: 1, 9\) in logits \(2\)"):
        w.finish()
    w.close()
    jpath = root / SHARD / "journal.jsonl"
    lines = [json.loads(x) for x in jpath.read_bytes().splitlines()]
    assert [ln.get("nonfinite") for ln in lines] == [{"logits": [1]}, None, {"logits": [9]}]
    lines[2]["nonfinite"] = {"logits": "9"}
    jpath.write_bytes(b"".join(fmt.canonical(fmt.seal(x)) + b"\n" for x in lines))
    w = kc.create_or_resume(root, m)
    assert w.pending_chunks() == [2]
    w.write_chunk(2, chunk_arrays(m, *w.chunk_range(2)))
    w.finish(allow_nonfinite=True)
    doc = json.loads((root / SHARD / "COMPLETE.json").read_text())
    assert doc["nonfinite"] == {"samples": 1, "first": [1], "arrays": {"logits": 1}}
    problems = kc.verify(root)  # the malformed line stays in the file and is reported, nothing else
    assert len(problems) == 1 and "journal.jsonl line 3 is damaged" in problems[0]
