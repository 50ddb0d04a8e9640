"""TeacherRunner targets in both reduce modes against float64 NumPy targets of forward-hook activations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import _models as M
import numpy as np
import onnxruntime as ort
import pytest

from kdpipe.errors import KdpipeError
from kdpipe.teacher import TeacherRunner, auto_taps, load_teacher

CASES = [
    ("resnet", "legacy", True),
    ("resnet", "dynamo", False),
    ("wrn", "dynamo", True),
    ("nhwc", "legacy", True),
]
IDS = [f"{n}-{e}-{'dyn' if d else 'b1'}" for n, e, d in CASES]
VARIANTS = M.DCT_VARIANTS


@pytest.mark.parametrize("reduce", ["graph", "native"])
@pytest.mark.parametrize(("name", "exporter", "dynamic"), CASES, ids=IDS)
def test_targets_match_torch(name, exporter, dynamic, reduce):
    graph = load_teacher(M.export(name, exporter, dynamic))
    taps = auto_taps(graph)
    runner = TeacherRunner(
        graph,
        taps,
        None,
        {"logits", "at", "pooled", "dct"},
        provider="cpu",
        threads=1,
        reduce=reduce,
        dct_variants=VARIANTS,
        spinning=False,
    )
    x = M.sample_input(name, 3, seed=7)
    out = runner.run(x)
    logits, acts = M.hooked(name, x, [p for p, _ in M.MODELS[name].STAGES])
    want = {"logits"} | {f"{k}.{i}" for i in range(len(taps)) for k in ("at", "pooled")}
    want |= {f"dct.{v}.{i}" for i in range(len(taps)) for v in VARIANTS}
    assert set(out) == want
    assert all(v.dtype == np.float32 for v in out.values())
    np.testing.assert_allclose(out["logits"], logits, atol=1e-5, rtol=0)
    for i, (act, (_, axis)) in enumerate(zip(acts, M.MODELS[name].STAGES, strict=True)):
        ref = M.reference_targets(act, axis)
        np.testing.assert_allclose(out[f"at.{i}"], ref["at"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(out[f"pooled.{i}"], ref["pooled"], atol=1e-5, rtol=0)
        for v in VARIANTS:
            np.testing.assert_allclose(out[f"dct.{v}.{i}"], ref[f"dct.{v}"], atol=2e-5, rtol=0)


def test_only_requested_targets_and_io_binding():
    graph = load_teacher(M.export("wrn", "legacy", True))
    taps = auto_taps(graph)
    x = M.sample_input("wrn", 2, seed=1)
    only_logits = TeacherRunner(graph, [], None, {"logits"}, provider="cpu").run(x)
    assert set(only_logits) == {"logits"}
    dct = TeacherRunner(graph, taps, None, {"dct"}, provider="cpu", dct_variants=("dct2",)).run(x)
    assert set(dct) == {f"dct.dct2.{i}" for i in range(3)}
    plain = TeacherRunner(graph, taps, None, {"at", "pooled"}, provider="cpu", io_binding=False).run(x)
    bound = TeacherRunner(graph, taps, None, {"at", "pooled"}, provider="cpu", io_binding=True).run(x)
    assert set(plain) == set(bound)
    for k in plain:
        np.testing.assert_array_equal(plain[k], bound[k])


def test_providers():
    graph = load_teacher(M.export("resnet", "legacy", True))
    runner = TeacherRunner(graph, [], None, {"logits"}, provider="auto", threads=1, spinning=False)
    assert runner.providers[-1] == "CPUExecutionProvider"
    assert runner.session.get_session_options().intra_op_num_threads == 1
    assert (
        runner.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        == "0"
    )
    cpu = TeacherRunner(graph, [], None, {"logits"}, provider="cpu")
    assert cpu.providers == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in runner.providers:
        with pytest.raises(KdpipeError, match="CUDA"):
            TeacherRunner(graph, [], None, {"logits"}, provider="cuda")
    with pytest.raises(KdpipeError, match="provider"):
        TeacherRunner(graph, [], None, {"logits"}, provider="tpu")
    assert "CPUExecutionProvider" in ort.get_available_providers()


def test_bad_arguments():
    graph = load_teacher(M.export("resnet", "legacy", True))
    with pytest.raises(KdpipeError, match="need taps"):
        TeacherRunner(graph, [], None, {"at"}, provider="cpu")
    with pytest.raises(KdpipeError, match="unknown target"):
        TeacherRunner(graph, [], None, {"features"}, provider="cpu")
    with pytest.raises(KdpipeError, match="DCT"):
        TeacherRunner(graph, auto_taps(graph), None, {"dct"}, provider="cpu", dct_variants=("fft",))
    runner = TeacherRunner(graph, [], None, {"logits"}, provider="cpu")
    with pytest.raises(KdpipeError, match="shape"):
        runner.run(np.zeros((2, 3, 9, 9), np.float32))


AFFINITY = """
import os, sys
sys.path.insert(0, {tests!r})
import _models as M
from kdpipe.teacher import TeacherRunner, load_teacher
os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})  # as if Slurm gave this job one CPU
runner = TeacherRunner(load_teacher({path!r}), [], None, {{"logits"}}, provider="cpu")
print(runner.session.get_session_options().intra_op_num_threads)
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux CPU affinity")
def test_default_threads_follow_the_cpu_binding():
    """Without --threads the session gets as many threads as CPUs the process is bound to."""
    path = M.export("resnet", "legacy", True)
    code = AFFINITY.format(tests=str(Path(__file__).parent), path=path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "1"
