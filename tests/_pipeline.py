"""Helpers of the `kdpipe run` tests: a pipeline YAML on the tiny test teacher, the CLI as a process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from _distill import teacher, train_data, val_data

import kdpipe.cache as kc


def pipeline_yaml(workdir: Path, extra_students: str = "", data: str | None = None, **cache: object) -> str:
    """A pipeline: the tiny teacher, 2 float32 views, one 1-epoch `kd` student; ``cache`` adds cache keys."""
    opts = "".join(f"  {k}: {v}\n" for k, v in cache.items())
    return f"""\
name: tiny
workdir: {workdir}
teacher:
  onnx: {teacher()}
data:
  train: {data or train_data()}
  val: {val_data()}
cache:
  views: 2
  dtype: float32
  vec_dtype: float32
  threads: 1
{opts}distill:
  student: resnet8
  epochs: 1
  batch_size: 32
  lr: 0.05
  workers: 0
  threads: 1
  students:
    - name: kd
      method: kd
{extra_students}"""


def kdpipe_run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`kdpipe run ARGS` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "kdpipe", "run", *args], capture_output=True, text=True, timeout=600, env=env
    )


def same_cache(a: Path, b: Path) -> None:
    """The two complete caches hold the same arrays, byte for byte (whatever their sharding)."""
    ca, cb = kc.open(a), kc.open(b)
    assert sorted(ca.arrays) == sorted(cb.arrays)
    for name in ca.arrays:
        np.testing.assert_array_equal(ca.array(name)[:], cb.array(name)[:], err_msg=name)


def student_outputs(run: Path) -> np.ndarray:
    """The exported student's logits on a fixed random batch (onnxruntime)."""
    sess = ort.InferenceSession(str(run / "student.onnx"), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [8 if not isinstance(d, int) else d for d in inp.shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return sess.run(None, {inp.name: x})[0]


def same_student(a: Path, b: Path) -> None:
    """The two runs exported students with identical outputs."""
    np.testing.assert_array_equal(student_outputs(a), student_outputs(b))


def world_sizes(summary: dict) -> list[int]:
    """The distinct DDP world sizes a run's summary.json records (``world_size``, or a list of them)."""
    ws = summary.get("world_sizes", summary.get("world_size"))
    if isinstance(ws, dict):
        ws = list(ws.values())
    return sorted({int(w) for w in (ws if isinstance(ws, list) else [ws])})
