"""`kdpipe run --executor slurm` and the sbatch templates on a real single-node Slurm (tests/_slurm.py).

- the pipeline through Slurm (a 2-task cache array, a student after it, the evaluations after that)
  gives the same cache files and the same student as the local executor; re-submitting submits nothing;
- an array task cancelled mid-run (scancel) and re-submitted completes the cache, equal to a
  one-process cache made by plain `kdpipe cache-teacher`;
- pipelines/cluster/slurm-cache-teacher.sbatch and slurm-distill.sbatch run as they are (the latter
  through torchrun with 2 processes).

Skipped, with one line saying why, where Slurm cannot be had (not root, no apt-get, daemons refuse).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from _distill import make_npz, run_ok, teacher, train_data, val_data
from _pipeline import kdpipe_run, pipeline_yaml, same_cache, same_student, world_sizes

import kdpipe.cache as kc

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "pipelines" / "cluster"


def job_ids(workdir: Path) -> list[str]:
    return [str(j["id"]) for j in json.loads((workdir / "slurm" / "jobs.json").read_text()).values()]


def test_pipeline_through_slurm_equals_local(slurm, tmp_path):
    slurm_cfg = (
        'slurm:\n  cpus_per_task: 1\n  distill:\n    time: "00:30:00"\n    extra: ["--comment=kdpipe-test"]\n'
    )
    (tmp_path / "p.yaml").write_text(pipeline_yaml(tmp_path / "slurm-run", shards=2) + slurm_cfg)
    r = kdpipe_run(str(tmp_path / "p.yaml"), "--executor", "slurm", env=slurm.env)
    assert r.returncode == 0, r.stderr
    assert "cache-teacher: array job" in r.stdout and "(tasks 0-1 of 2)" in r.stdout
    assert "distill kd: job" in r.stdout and "evaluate: job" in r.stdout
    ids = job_ids(tmp_path / "slurm-run")
    assert len(ids) == 3
    # the local executor, meanwhile (same YAML, another workdir)
    r = kdpipe_run(str(tmp_path / "p.yaml"), "--set", f"workdir={tmp_path / 'local-run'}")
    assert r.returncode == 0, r.stderr
    slurm.wait(ids)
    for jid in ids:
        assert set(slurm.states(jid)) == {"COMPLETED"}, (jid, slurm.states(jid))
    # the YAML's slurm settings reached Slurm: the distill job's time limit and extra #SBATCH line
    fields = slurm.run("scontrol", "--oneliner", "show", "job", ids[1]).stdout.split()
    assert "TimeLimit=00:30:00" in fields and "Comment=kdpipe-test" in fields, fields
    s, loc = tmp_path / "slurm-run", tmp_path / "local-run"
    for shard in ("00000-of-00002", "00001-of-00002"):
        for f in sorted((loc / "cache" / "shards" / shard).glob("*.npy")):
            assert f.read_bytes() == (s / "cache" / "shards" / shard / f.name).read_bytes(), f
    same_cache(s / "cache", loc / "cache")
    assert kc.verify(s / "cache") == []
    same_student(s / "kd", loc / "kd")
    ev_s, ev_l = (json.loads((d / "kd" / "eval.json").read_text()) for d in (s, loc))
    assert ev_s["top1"] == ev_l["top1"]
    assert (
        json.loads((s / "teacher_eval.json").read_text())["top1"]
        == json.loads((loc / "teacher_eval.json").read_text())["top1"]
    )
    # re-submitting: everything is complete, nothing is submitted
    r = kdpipe_run(str(tmp_path / "p.yaml"), "--executor", "slurm", env=slurm.env)
    assert r.returncode == 0, r.stderr
    assert "every step is complete; nothing to submit" in r.stdout
    assert "skip cache-teacher shard 1/2" in r.stdout and "skip distill kd" in r.stdout


def test_cancelled_array_task_is_resubmitted_and_completes(slurm, tmp_path):
    data = make_npz(tmp_path / "big.npz", 3000, seed=3)
    text = pipeline_yaml(tmp_path / "w", data=str(data), shards=2, chunk_size=4, batch_size=8)
    text = text[: text.index("distill:")] + "evaluate:\n  teacher: false\nslurm:\n  cpus_per_task: 1\n"
    (tmp_path / "p.yaml").write_text(text)
    r = kdpipe_run(str(tmp_path / "p.yaml"), "--executor", "slurm", env=slurm.env)
    assert r.returncode == 0, r.stderr
    (array,) = job_ids(tmp_path / "w")
    journal = tmp_path / "w" / "cache" / "shards" / "00001-of-00002" / "journal.jsonl"
    deadline = time.monotonic() + 120
    while not (journal.exists() and journal.read_text().count("\n") >= 1):  # cancel after its 1st chunk
        assert time.monotonic() < deadline, "task 1 wrote no chunk in 120 s"
        time.sleep(0.05)
    slurm.run("scancel", f"{array}_1")
    slurm.wait([array])
    assert "CANCELLED" in slurm.states(f"{array}_1"), slurm.states(array)
    info = kc.info(tmp_path / "w" / "cache")
    assert not info["complete"], "task 1 finished before it was cancelled: make the data larger"
    assert 0 < info["shards"]["chunks_done"] < info["num_chunks"]
    # re-submitting runs only the unfinished task, which resumes its shard
    r = kdpipe_run(str(tmp_path / "p.yaml"), "--executor", "slurm", env=slurm.env)
    assert r.returncode == 0, r.stderr
    assert "(tasks 1 of 2)" in r.stdout
    (array2,) = job_ids(tmp_path / "w")
    slurm.wait([array2])
    assert slurm.states(array2) == ["COMPLETED"]
    log = next((tmp_path / "w" / "slurm").glob(f"cache-{array2}_1.out")).read_text()
    assert "chunk(s) to do" in log
    assert kc.verify(tmp_path / "w" / "cache") == []
    ref = tmp_path / "ref"
    run_ok(
        ["cache-teacher", teacher(), "--data", str(data), "--out", str(ref), "--views", "2"]
        + ["--dtype", "float32", "--vec-dtype", "float32", "--chunk-size", "4", "--batch-size", "8"]
        + ["--threads", "1", "--no-progress"]
    )
    same_cache(tmp_path / "w" / "cache", ref)


def test_sbatch_templates_run_as_they_are(slurm, tmp_path):
    env = {
        **slurm.env,
        "PATH": f"{Path(os.sys.executable).parent}:{os.environ.get('PATH', '')}",
        "TEACHER": teacher(),
        "DATA": train_data(),
        "VIEWS": "2",
        "CACHE": str(tmp_path / "cache"),
    }
    out = tmp_path / "logs"
    out.mkdir()
    r = slurm_sbatch(slurm, env, "--array=0-2", "--cpus-per-task=1", f"--output={out}/c-%a.out", "--wait")
    assert r.returncode == 0, r.stderr + "".join(p.read_text() for p in out.iterdir())
    ref = tmp_path / "ref"
    run_ok(
        ["cache-teacher", teacher(), "--data", train_data(), "--out", str(ref), "--views", "2"]
        + ["--no-progress"]
    )
    same_cache(tmp_path / "cache", ref)
    assert sorted(p.name for p in (tmp_path / "cache" / "shards").iterdir())[-1] == "00002-of-00003"

    env.update(
        {
            "CACHE": str(ref),
            "VAL_DATA": val_data(),
            "OUT": str(tmp_path / "run"),
            "STUDENT": "resnet8",
            "METHOD": "at+kd",
            "EPOCHS": "1",
            "NPROC": "2",
            "KDPIPE_ARGS": "--batch-size 32 --workers 0 --threads 1",
        }
    )
    r = slurm_sbatch(
        slurm, env, "--cpus-per-task=2", f"--output={out}/d.out", "--wait", script="slurm-distill.sbatch"
    )
    log = (out / "d.out").read_text()
    assert r.returncode == 0, log
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert world_sizes(summary) == [2] and np.isfinite(summary["last_top1"])
    assert (tmp_path / "run" / "student.onnx").is_file()


def slurm_sbatch(slurm, env: dict[str, str], *options: str, script: str = "slurm-cache-teacher.sbatch"):
    import subprocess

    return subprocess.run(
        ["sbatch", *options, str(CLUSTER / script)], capture_output=True, text=True, env=env, timeout=300
    )
