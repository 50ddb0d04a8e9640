"""DDP on any world size, with real torchrun processes (gloo on CPU).

A run started on 2 processes, resumed on 1, then on 2 again (the same global batch of 32) follows the
loss curve of the uninterrupted 2-process run and of a plain 1-process run, to float rounding: the
global batch holds the same samples and views at every step, BatchNorm normalises over the global
batch and the logged losses are means over the processes. Also: multi-node torchrun (``--nnodes 2``
on localhost, c10d rendezvous) trains the same run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _distill import KDPIPE, cached, distill_args, read_jsonl, subprocess_env

pytestmark = pytest.mark.slow  # every launch imports torch in each process: ~5-10 s each on 2 cores

EPOCHS = 2  # 128 samples / global batch 32: 4 steps an epoch, 8 in all
TERMS = ("loss", "ce", "kd", "afd")


def _args(out: Path, *extra: str) -> list[str]:
    args = distill_args(out, "--method", "afd+kd", "--no-export", "--device", "cpu", "--global-batch", "32",
                        *extra, cache_path=cached(2, "float32"), epochs=EPOCHS)  # fmt: skip
    return args


def _env() -> dict[str, str]:
    return subprocess_env() | {"KDPIPE_LOG_STEPS": "1"}


def _launch(out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [KDPIPE, *_args(out, *extra)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "kdpipe", *_args(out, *extra)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _curve(out: Path) -> dict[str, np.ndarray]:
    recs = read_jsonl(out / "steps.jsonl")
    assert [(r["epoch"], r["step"]) for r in recs] == [(e, s) for e in range(EPOCHS) for s in range(4)]
    return {k: np.array([r[k] for r in recs]) for k in TERMS}


def _close(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for k in TERMS:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world") / "two"
    _launch(out, 2)
    return out


def test_resume_on_another_world_size_keeps_the_curve(two_procs: Path, tmp_path: Path) -> None:
    one, cut = tmp_path / "one", tmp_path / "cut"
    _launch(one, 1)
    _close(_curve(one), _curve(two_procs))  # 1 x 32 == 2 x 16, step by step

    _launch(cut, 2, "--max-steps", "3")  # stops inside epoch 1
    r = _launch(cut, 1, "--resume", "--max-steps", "6")  # 1 process, inside epoch 2
    assert f"resuming {cut} at epoch 1 step 3" in r.stderr
    r = _launch(cut, 2, "--resume")
    assert f"resuming {cut} at epoch 2 step 2" in r.stderr
    _close(_curve(cut), _curve(two_procs))
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["world_sizes"] == [2, 1, 2] and summary["effective_batch"] == 32
    assert [m["epoch"] for m in read_jsonl(cut / "metrics.jsonl")] == [1, 2]


def test_resume_with_another_global_batch_is_refused(tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    _launch(cut, 1, "--max-steps", "1")  # global batch 32
    args = _args(cut, "--resume")
    args[args.index("--global-batch") + 1] = "0"
    args[args.index("--batch-size") + 1] = "16"  # 16 per process x 1
    r = subprocess.run([KDPIPE, *args], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("kdpipe: error: --resume:") and "global batch 32 -> 16" in line
    assert "--global-batch 32" in line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_nodes_on_localhost_c10d(two_procs: Path, tmp_path: Path) -> None:
    out = tmp_path / "nodes"
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "kdpipe-test",
                "-m",
                "kdpipe",
                *_args(out),
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [e[-2000:] for _, e in results]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["world_sizes"] == [2]
    _close(_curve(out), _curve(two_procs))
