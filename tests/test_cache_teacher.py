"""`kdpipe cache-teacher` end to end: tiny torch teachers exported to ONNX, .npz data, the real CLI.

Every stored target is compared with float64 NumPy targets of the torch model's own activations
(forward hooks on the stage modules), on views rebuilt in this file from the stored view parameters
(np.pad reflect + slicing + flip), and the arrays are re-read from disk with plain ``np.load``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import _models as M
import numpy as np
import pytest
from click.testing import CliRunner

import kdpipe.cache
from kdpipe.cache_teacher import ALL_TARGETS, DEFAULT_TARGETS, CacheJob, cache_teacher
from kdpipe.cli import cli
from kdpipe.errors import KdpipeError

VARIANTS = M.DCT_VARIANTS
N = 64  # samples of the small data set
K = 5  # classes of the tiny teachers
PAD = 2
SHARD = Path("shards") / "00000-of-00001"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
STORED = {"float16": np.float16, "float32": np.float32, "int32": np.int32, "int64": np.int64}


# ------------------------------------------------------------------------------------------ fixtures
def _save_npz(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, M.SIZE, M.SIZE, 3), dtype=np.uint8)
    y = np.arange(n) % K  # every class present, so num_classes is K
    rng.shuffle(y)
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_npz(tmp_path_factory.mktemp("data") / "small.npz", N, seed=3)


def _teacher(name: str, exporter: str) -> str:
    return M.export(name, exporter, True)


# ------------------------------------------------------------------------------ independent references
def _rebuild_views(images: np.ndarray, params: np.ndarray, kind: str, pad: int) -> np.ndarray:
    """uint8 (N*V, S, S, C) views from (N, V, 5) params, written independently of kdpipe.data.views."""
    n, v = params.shape[:2]
    size = M.SIZE
    src = (
        np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
        if kind == "pad-crop"
        else images
    )
    out = np.empty((n, v, size, size, images.shape[3]), np.uint8)
    for i in range(n):
        for j in range(v):
            y0, x0, h, w, flip = (int(t) for t in params[i, j])
            assert (h, w) == (size, size)
            crop = src[i, y0 : y0 + h, x0 : x0 + w]
            out[i, j] = crop[:, ::-1] if flip else crop
    return out.reshape(n * v, size, size, -1)


def _expected(name: str, npz: Path, params: np.ndarray, kind: str, pad: int) -> dict[str, np.ndarray]:
    """Every cache array, recomputed: labels from the file, targets from the torch model's hooks."""
    with np.load(npz) as z:
        images, labels = z["x"], z["y"].astype(np.int64)
    n, v = params.shape[:2]
    views = _rebuild_views(images, params, kind, pad)
    x = (views.astype(np.float64) / 255.0).astype(np.float32)  # the teacher's default scale 1/255
    if name != "nhwc":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    stages = M.MODELS[name].STAGES
    logits, acts = M.hooked(name, x, [p for p, _ in stages])
    ref = {"labels": labels, "logits": logits.reshape(n, v, -1)}
    for i, (act, (_, axis)) in enumerate(zip(acts, stages, strict=True)):
        for key, val in M.reference_targets(act, axis).items():
            ref[f"{key}.{i}"] = val.reshape(n, v, *val.shape[1:])
    return ref


def _via_reader(c: kdpipe.cache.Cache, name: str) -> np.ndarray:
    """Array ``name`` through the public reader API (targets / labels / view_params)."""
    if name == "labels":
        return np.asarray(c.labels)
    if name == "view_params":
        return np.asarray(c.view_params)
    if name == "logits":
        return np.asarray(c.targets("logits"))
    parts = name.split(".")
    if parts[0] == "dct":
        return np.asarray(c.targets("dct", tap=int(parts[2]), variant=parts[1]))
    return np.asarray(c.targets(parts[0], tap=int(parts[1])))


def _check_cache(out: Path, name: str, npz: Path, views: int, pad: int = PAD) -> dict[str, np.ndarray]:
    """Open ``out`` with kdpipe and with np.load; compare every array with the references."""
    c = kdpipe.cache.open(out)
    assert c.complete and c.verify() == []
    manifest = json.loads((out / "manifest.json").read_text())
    kind = manifest["views"]["policy"]["kind"]
    v = max(views, 1)
    assert len(c) == N and c.num_views == v
    assert kind == ("none" if views == 0 else "pad-crop")
    # the hooked stage module, or an enclosing module with the same output (mlp for its last block mlp.1)
    paths = [t["module_path"] for t in manifest["taps"]]
    stages = [p for p, _ in M.MODELS[name].STAGES]
    assert len(paths) == len(stages)
    assert all(s == p or s.startswith(f"{p}.") for p, s in zip(paths, stages, strict=True)), paths

    disk = {a: np.load(out / SHARD / f"{a}.npy") for a in manifest["arrays"]}
    for a, meta in manifest["arrays"].items():
        assert disk[a].dtype == STORED[meta["dtype"]], a
        np.testing.assert_array_equal(_via_reader(c, a), disk[a], err_msg=a)

    params = disk["view_params"]
    assert params.shape == (N, v, 5)
    if views == 0:
        np.testing.assert_array_equal(params, np.broadcast_to([0, 0, M.SIZE, M.SIZE, 0], params.shape))
    else:
        assert (params[..., 2:4] == M.SIZE).all()
        assert params[..., :2].min() >= 0 and params[..., :2].max() <= 2 * pad
        assert set(np.unique(params[..., 4])) == {0, 1}
        assert len(np.unique(params.reshape(N, -1), axis=0)) > N // 2  # the views differ per sample

    ref = _expected(name, npz, params, kind, pad)
    assert set(disk) - {"view_params"} <= set(ref)
    for a, meta in manifest["arrays"].items():
        if a == "view_params":
            continue
        got = disk[a].astype(np.float64) if meta["dtype"].startswith("float") else disk[a]
        if meta["dtype"] == "float16":
            np.testing.assert_allclose(got, ref[a], rtol=1e-3, atol=1e-4, err_msg=a)
        elif meta["dtype"] == "float32":
            np.testing.assert_allclose(got, ref[a], rtol=1e-5, atol=2e-5, err_msg=a)
        else:
            np.testing.assert_array_equal(got, ref[a], err_msg=a)

    # one vectorised gather of random (sample, view) items decodes to the same numbers
    rng = np.random.default_rng(0)
    s, w = rng.integers(0, N, 20), rng.integers(0, v, 20)
    np.testing.assert_array_equal(c.gather("at.0", s, w), disk["at.0"][s, w].astype(np.float32))
    return ref


def _accuracy(ref: dict[str, np.ndarray]) -> float:
    return float((ref["logits"].argmax(-1) == ref["labels"][:, None]).mean())


def _kdpipe(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdpipe", "cache-teacher", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def _quiet_job(**kw: object) -> dict:
    """A job caching every target kind but grad (tests/test_grad_targets.py has it; the default leaves
    DCT out: distill derives it)."""
    kw = {"targets": tuple(t for t in ALL_TARGETS if t != "grad"), "vec_dtype": "float32", **kw}
    return cache_teacher(CacheJob(progress=False, threads=1, **kw), log=lambda _m: None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- tests
def test_cli_process_wrn_dynamo_views(data, tmp_path):
    """Pre-activation WRN, dynamo exporter (external weights), 3 pad-crop views, all 3 DCT variants."""
    out = tmp_path / "cache"
    args = [
        _teacher("wrn", "dynamo"),
        "--data",
        str(data),
        "--out",
        str(out),
        "--views",
        "3",
        "--pad",
        str(PAD),
    ]
    args += ["--dct-variant", ",".join(VARIANTS), "--threads", "1", "--no-progress"]
    r = _kdpipe(*args)
    assert r.returncode == 0, r.stderr
    ref = _check_cache(out, "wrn", data, views=3)

    summary = r.stdout.strip().splitlines()[-1]
    assert "complete: True" in summary and f"{N} samples x 3 view(s)" in summary
    acc = re.search(r"teacher top-1 on these views: ([0-9.]+)%", summary)
    assert acc is not None, summary
    assert float(acc.group(1)) == pytest.approx(100 * _accuracy(ref), abs=0.006)

    # a complete cache: a rerun does nothing (no byte changes, no chunk redone) and exits 0
    def contents() -> dict[str, str]:
        files = [p for p in (out / SHARD).iterdir() if p.name != "lock"]  # the lock records the pid
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    before = contents()
    again = CliRunner().invoke(cli, ["cache-teacher", *args])
    assert again.exit_code == 0, again.output
    assert "cached 0 item(s)" in again.stdout and "nothing to do" in again.stderr
    assert contents() == before


@pytest.mark.parametrize(
    ("name", "exporter", "views", "reduce", "dtype", "chunk"),
    [  # chunks of 24 / 10 samples: several chunks, a short last one, the input blocks reused
        ("resnet", "legacy", 0, "graph", "float16", 24),
        ("nhwc", "legacy", 3, "native", "float32", 0),
        ("nhwc", "legacy", 0, "graph", "float16", 0),
        ("resnet", "legacy", 3, "native", "float16", 10),
    ],
    ids=[
        "resnet-legacy-plain-graph",
        "nhwc-legacy-views-native-f32",
        "nhwc-plain-graph",
        "resnet-views-native",
    ],
)
def test_cli_runner_targets(data, tmp_path, name, exporter, views, reduce, dtype, chunk):
    out = tmp_path / "cache"
    r = CliRunner().invoke(
        cli,
        [
            "cache-teacher",
            _teacher(name, exporter),
            "--data",
            str(data),
            "--out",
            str(out),
            "--views",
            str(views),
            "--pad",
            str(PAD),
            "--reduce",
            reduce,
            "--dtype",
            dtype,
            "--dct-variant",
            ",".join(VARIANTS),
            "--threads",
            "1",
            "--chunk-size",
            str(chunk),
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arrays"]["at.0"]["dtype"] == dtype
    assert manifest["chunk_size"] == (chunk or 4096 // max(views, 1))
    assert [t["layout"] for t in manifest["taps"]] == (["NCHW", "NHWC"] if name == "nhwc" else ["NCHW"] * 3)
    _check_cache(out, name, data, views=views)


def test_reduce_graph_equals_native(data, tmp_path):
    arrays = {}
    for reduce in ("graph", "native"):
        out = tmp_path / reduce
        s = _quiet_job(
            teacher=_teacher("wrn", "dynamo"),
            data=str(data),
            out=str(out),
            views=2,
            pad=PAD,
            reduce=reduce,
            map_dtype="float32",
            dct_variants=VARIANTS,
        )
        assert s["complete"]
        arrays[reduce] = {p.stem: np.load(p) for p in (out / SHARD).glob("*.npy")}
    g, n = arrays["graph"], arrays["native"]
    assert set(g) == set(n) and len(g) == 1 + 1 + 3 * (2 + len(VARIANTS)) + 1
    for a in g:
        if g[a].dtype.kind == "f":
            np.testing.assert_allclose(g[a], n[a], rtol=1e-5, atol=2e-6, err_msg=a)
        else:
            np.testing.assert_array_equal(g[a], n[a], err_msg=a)


def test_killed_run_resumes_without_redoing_chunks(tmp_path):
    npz = _save_npz(tmp_path / "resume.npz", 32, seed=5)
    out = tmp_path / "killed"
    teacher = _teacher("resnet", "legacy")
    args = [teacher, "--data", str(npz), "--out", str(out), "--chunk-size", "4", "--views", "2"]
    args += ["--pad", str(PAD), "--threads", "1", "--no-progress"]
    journal = out / SHARD / "journal.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdpipe", "cache-teacher", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 60
        while not (journal.exists() and journal.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done_before = journal.read_bytes().splitlines()
    num_chunks = 32 // 4
    assert 1 <= len(done_before) < num_chunks, "the process was not killed mid-run"

    # not reported complete: no COMPLETE.json, open() refuses, info says incomplete
    assert not (out / SHARD / "COMPLETE.json").exists()
    with pytest.raises(KdpipeError):
        kdpipe.cache.open(out)
    assert not kdpipe.cache.open(out, require_complete=False).complete
    assert kdpipe.cache.info(out)["complete"] is False

    r = CliRunner().invoke(cli, ["cache-teacher", *args])  # the same command again
    assert r.exit_code == 0, r.output
    assert f"resuming: {num_chunks - len(done_before)} of {num_chunks} chunk(s) left" in r.stderr
    assert f"cached {(num_chunks - len(done_before)) * 4 * 2} item(s)" in r.stdout
    lines = journal.read_bytes().splitlines()
    assert lines[: len(done_before)] == done_before  # finished chunks were not redone
    chunks = [json.loads(line)["chunk"] for line in lines]
    assert sorted(chunks) == list(range(num_chunks))  # every chunk journaled exactly once
    assert kdpipe.cache.open(out).verify() == []

    clean = tmp_path / "clean"
    _quiet_job(
        teacher=teacher,
        data=str(npz),
        out=str(clean),
        chunk_size=4,
        views=2,
        pad=PAD,
        targets=DEFAULT_TARGETS,
        vec_dtype=None,
    )  # what the CLI's defaults cache
    for p in sorted((clean / SHARD).glob("*.npy")):
        np.testing.assert_array_equal(np.load(out / SHARD / p.name), np.load(p), err_msg=p.name)


def test_manifest_records_dataset_fingerprint(data, tmp_path):
    out = tmp_path / "cache"
    _quiet_job(teacher=_teacher("resnet", "legacy"), data=str(data), out=str(out), targets=("logits",))
    manifest = json.loads((out / "manifest.json").read_text())
    with np.load(data) as z:
        x, y = z["x"], z["y"]
    content = hashlib.sha256(str(x.shape).encode())
    content.update(np.ascontiguousarray(x).tobytes())
    assert manifest["dataset"]["fingerprint"] == {
        "name": data.name,
        "count": N,
        "num_classes": K,
        "labels_sha256": hashlib.sha256(y.astype("<i8").tobytes()).hexdigest(),
        "content_sha256": content.hexdigest(),
    }
    assert set(manifest["arrays"]) == {"logits", "labels", "view_params"}
    # the same --out with one changed pixel is a different data set: refused
    changed = tmp_path / "changed.npz"
    x2 = x.copy()
    x2[0, 0, 0, 0] ^= 1
    np.savez(changed, x=x2, y=y)
    with pytest.raises(KdpipeError, match="dataset/fingerprint"):
        _quiet_job(teacher=_teacher("resnet", "legacy"), data=str(changed), out=str(out), targets=("logits",))


def _truncated(tmp: Path) -> str:
    src = Path(_teacher("resnet", "legacy"))
    dst = tmp / "truncated.onnx"
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return str(dst)


def _reweighted(tmp: Path) -> tuple[str, str]:
    """Two copies of the dynamo WRN: same .onnx bytes, different weights in the external .data file."""
    src = Path(_teacher("wrn", "dynamo"))
    paths = []
    for k in (0, 1):
        d = tmp / f"t{k}"
        d.mkdir()
        shutil.copy(src, d / src.name)
        weights = bytearray((src.parent / (src.name + ".data")).read_bytes())
        if k:
            w = np.frombuffer(weights, np.float32).copy()
            w[:16] *= 1.5
            weights[:64] = w[:16].tobytes()
        (d / (src.name + ".data")).write_bytes(bytes(weights))
        paths.append(str(d / src.name))
    return paths[0], paths[1]


BAD = {
    "missing-teacher": (lambda t, d: ["nope.onnx", "--data", d], "does not exist"),
    "truncated-onnx": (lambda t, d: [_truncated(t), "--data", d], "not a readable ONNX model"),
    "unknown-tap": (lambda t, d: [_teacher("resnet", "legacy"), "--data", d, "--taps", "layer9"], "layer1"),
    "unknown-dataset": (lambda t, d: [_teacher("resnet", "legacy"), "--data", "no-such-set"], "not found"),
    "negative-views": (lambda t, d: [_teacher("resnet", "legacy"), "--data", d, "--views", "-1"], ">= 0"),
    "unknown-targets": (
        lambda t, d: [_teacher("resnet", "legacy"), "--data", d, "--targets", "logits,gram"],
        "choose from",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line(data, tmp_path, case):
    make, expect = BAD[case]
    r = CliRunner().invoke(cli, ["cache-teacher", *make(tmp_path, str(data)), "--out", str(tmp_path / "c")])
    _assert_one_line_error(r, expect)
    if case == "unknown-tap":
        assert "close matches" in r.stderr


def test_other_teacher_into_existing_out(data, tmp_path):
    first, second = _reweighted(tmp_path)
    out = str(tmp_path / "c")
    base = ["cache-teacher", "--data", str(data), "--out", out, "--threads", "1", "--no-progress"]
    ok = CliRunner().invoke(cli, [*base, first])
    assert ok.exit_code == 0, ok.output
    # same graph file, weights differ only in the external data: still another teacher
    _assert_one_line_error(CliRunner().invoke(cli, [*base, second]), "teacher/sha256")
    _assert_one_line_error(CliRunner().invoke(cli, [*base, _teacher("resnet", "legacy")]), "another teacher")
    assert kdpipe.cache.open(out).complete


def _assert_one_line_error(r, expect: str) -> None:
    assert r.exit_code != 0
    assert r.exception is None or isinstance(r.exception, SystemExit)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("kdpipe: error: ") and expect in lines[0], lines[0]
    assert "Traceback" not in r.output


def test_bad_input_real_process(tmp_path):
    """The same guarantee from a real process: one line on stderr, exit status 2, no traceback."""
    r = _kdpipe(_truncated(tmp_path), "--data", "digits", "--out", str(tmp_path / "c"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("kdpipe: error: ") and r.stdout == ""
