"""Shared fixtures of the `kdpipe distill` tests: a tiny ONNX teacher, a tiny .npz dataset, a cache,
and helpers to run the real CLI (in-process through click, or as a subprocess).

The teacher is the zoo ``resnet8`` (grey 16x16 input, 4 classes) with fixed random weights, exported
by torch; datasets are random uint8 images whose labels depend on the image (so training can learn).
Everything is memoised per process in one temporary folder.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from click.testing import CliRunner

from kdpipe.cli import cli

SIDE = 16
CLASSES = 4
N_TRAIN = 128
N_VAL = 64
KDPIPE = str(Path(sys.executable).with_name("kdpipe"))

_DIR = Path(tempfile.mkdtemp(prefix="kdpipe-distill-tests-"))
atexit.register(shutil.rmtree, _DIR, True)


def make_npz(path: Path, n: int, seed: int, side: int = SIDE, channels: int = 1) -> Path:
    """Random uint8 images (n, side, side[, 3]); label = quadrant of the brightest 4x4 patch mod CLASSES."""
    rng = np.random.default_rng(seed)
    shape = (n, side, side) if channels == 1 else (n, side, side, channels)
    x = rng.integers(0, 120, size=shape, dtype=np.uint8)
    y = rng.integers(0, CLASSES, size=n).astype(np.int64)
    h = side // 2
    for q in range(CLASSES):  # a bright quadrant tells the class: learnable in a few steps
        sel = y == q
        r, c = divmod(q, 2)
        x[sel, r * h : (r + 1) * h, c * h : (c + 1) * h] += 120
    np.savez(path, x=x, y=y)
    return path


def export_quiet(model: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    """Export with the legacy exporter (opset 17, dynamic batch; ~10x faster to start than dynamo),
    one self-contained file, silencing its chatter."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (x,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )
    onnx.checker.check_model(str(path))
    return path


@cache
def teacher() -> str:
    """resnet8 (grey, 16x16, 4 classes), random weights with random BN statistics, as ONNX."""
    from kdpipe.student import create_model

    torch.manual_seed(0)
    m = create_model("resnet8", num_classes=CLASSES, in_chans=1)
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return str(export_quiet(m, torch.zeros(2, 1, SIDE, SIDE), _DIR / "teacher.onnx"))


@cache
def train_data() -> str:
    return str(make_npz(_DIR / "train.npz", N_TRAIN, seed=0))


@cache
def val_data() -> str:
    return str(make_npz(_DIR / "val.npz", N_VAL, seed=1))


def run_cli(args: list[str], env: dict[str, str] | None = None) -> Any:
    """Invoke the real click command in-process; returns the click Result (stderr separate)."""
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return CliRunner().invoke(cli, args, catch_exceptions=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_ok(args: list[str], env: dict[str, str] | None = None) -> Any:
    r = run_cli(args, env)
    assert r.exit_code == 0, r.stderr + r.stdout
    return r


@cache
def cached(
    views: int = 2, dtype: str = "float32", targets: str = "logits,at,dct,pooled", card: str | None = None
) -> str:
    """A complete cache of teacher() over train_data() (with the teacher card ``card``, if given)."""
    tag = "" if card is None else "-card" + hashlib.sha256(card.encode()).hexdigest()[:12]
    out = _DIR / f"cache-v{views}-{dtype}-{targets.replace(',', '_')}{tag}"
    run_ok(
        [
            "cache-teacher",
            teacher(),
            "--data",
            train_data(),
            "--out",
            str(out),
            "--views",
            str(views),
            "--dtype",
            dtype,
            "--vec-dtype",
            dtype,
            "--targets",
            targets,
            *(["--grad-dtype", dtype] if "grad" in targets else []),
            "--threads",
            "1",
            "--no-progress",
            *(["--card", card] if card else []),
        ]
    )
    return str(out)


def distill_args(out: Path, *extra: str, cache_path: str | None = None, epochs: int = 1) -> list[str]:
    """The common `kdpipe distill` arguments of the tests (resnet8 student, batch 32, no progress)."""
    src = ["--cache", cache_path] if cache_path else []
    return [
        "distill",
        *src,
        "--data",
        train_data(),
        "--student",
        "resnet8",
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--batch-size",
        "32",
        "--lr",
        "0.05",
        "--workers",
        "0",
        "--threads",
        "1",
        "--no-progress",
        *extra,
    ]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


def run_proc(args: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    """The installed `kdpipe` console script as a real process, in its own process group: on a
    timeout the whole group is killed (its DataLoader workers too, which hold the output pipes)."""
    import signal

    with subprocess.Popen(
        [KDPIPE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
        start_new_session=True, **kw,
    ) as p:  # fmt: skip
        try:
            out, err = p.communicate(timeout=timeout)
        except BaseException as e:  # a timeout, or Ctrl-C (which no longer reaches the new session)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            if isinstance(e, subprocess.TimeoutExpired):
                raise subprocess.TimeoutExpired(p.args, timeout, out, err) from None
            raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)
