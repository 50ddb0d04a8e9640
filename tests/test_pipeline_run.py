"""`kdpipe run PIPELINE.yaml` with the local executor: schema errors with line numbers, --dry-run, a full
run whose cache and student equal the ones made by running the steps by hand, skipping and resuming.

References are independent of the pipeline code: the same steps typed as plain `kdpipe` commands.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _distill import run_cli, run_ok, teacher, train_data, val_data
from _pipeline import kdpipe_run, pipeline_yaml, same_cache, same_student, world_sizes

import kdpipe.cache as kc

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ schema errors
@pytest.mark.parametrize(
    "text, line, message",
    [
        (
            "teacher:\n  onnx: {t}\ndata:\n  train: {d}\ncache:\n  views: 2\n  viewz: 3\n",
            7,
            "unknown key 'viewz'",
        ),
        ("teacher:\n  onnx: {t}\ndata:\n  train: {d}\ndistill:\n  epochs: ten\n", 6, "must be an integer"),
        ("teacher:\n  onnx: missing.onnx\ndata:\n  train: {d}\n", 2, "no such file"),
        ("teacher:\n  onnx: {t}\ndata:\n  train: nowhere.npz\n", 4, "not a built-in dataset"),
        ("teacher:\n  onnx: {t}\ndata:\n  train: {d}\ncache:\n  dtype: float8\n", 6, "must be one of"),
        ("teacher:\n  onnx: {t}\ndata:\n  train: {d}\n\n\nfoo: 1\n", 7, "unknown key 'foo'"),
        ("teacher:\n  onnx: {t}\ndata:\n  train: {d}\ncache:\n  flip: maybe\n", 6, "true or false"),
        (
            "teacher:\n  onnx: {t}\ndata:\n  train: {d}\ndistill:\n  students:\n    - method: kd\n",
            7,
            "needs a name",
        ),
        ("teacher:\n  onnx: {t}\ndata:\n  train: {d}\n  train: {d}\n", 5, "appears twice"),
        ("teacher:\n  onnx: {t}\ndata: [\n", 4, "not valid YAML"),
        ("teacher:\n  onnx: {t}\ndata:\n  train: {d}\nslurm:\n  time: 12:00:00\n", 6, "time must be quoted"),
        ("name: my pipe\nteacher:\n  onnx: {t}\ndata:\n  train: {d}\n", 1, "pipeline name 'my pipe'"),
    ],
)
def test_schema_mistakes_name_the_line(tmp_path, text, line, message):
    f = tmp_path / "p.yaml"
    f.write_text(text.format(t=teacher(), d=train_data()))
    r = run_cli(["run", str(f), "--dry-run"])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"kdpipe: error: {f}:{line}: ") and message in lines[0], lines[0]


def test_set_overrides_and_their_mistakes(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(pipeline_yaml(tmp_path / "w"))
    r = run_ok(["run", str(f), "--dry-run", "--set", "cache.views=3", "--set", "distill.students.0.seed=7"])
    assert "--views 3" in r.stdout and "--seed 7" in r.stdout
    for bad, msg in [
        ("cache.viewz=3", "--set cache.viewz: unknown key 'viewz'"),
        ("distill.epochs=x", "--set distill.epochs: distill option 'epochs' must be an integer"),
        ("distill.students.5.seed=1", "--set distill.students.5.seed: '5' is not an index"),
        ("novalue", "expected KEY=VALUE"),
    ]:
        r = run_cli(["run", str(f), "--dry-run", "--set", bad])
        assert r.exit_code == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_dry_run_prints_the_exact_commands_of_a_sweep(tmp_path):
    f = tmp_path / "p.yaml"
    w = tmp_path / "w"
    f.write_text(pipeline_yaml(w) + "  sweep:\n    method: [at, at+kd]\n    seed: [0, 1]\n")
    r = run_ok(["run", str(f), "--dry-run"])
    lines = r.stdout.strip().splitlines()
    cache = w / "cache"
    assert lines[0] == (
        f"kdpipe cache-teacher {teacher()} --data {train_data()} --out {cache} --views 2 --dtype float32 "
        "--vec-dtype float32 --threads 1 --shard 0/1 --no-progress"
    )
    common = "--student resnet8 --epochs 1 --batch-size 32 --lr 0.05 --workers 0 --threads 1"
    head = f"kdpipe distill --cache {cache} --data {train_data()} --val-data {val_data()}"
    names = ["kd", "at-seed0", "at-seed1", "at_kd-seed0", "at_kd-seed1"]
    methods = ["kd", "at", "at", "at+kd", "at+kd"]
    seeds = [None, 0, 1, 0, 1]
    for line, name, method, seed in zip(lines[1:6], names, methods, seeds, strict=True):
        tail = f" --method {method}" + ("" if seed is None else f" --seed {seed}")
        assert line == f"{head} --out {w / name} {common}{tail} --no-progress", line
    assert (
        lines[6]
        == f"kdpipe evaluate {w / 'kd' / 'student.onnx'} --data {val_data()} > {w / 'kd' / 'eval.json'}"
    )
    assert lines[-1] == f"kdpipe evaluate {teacher()} --data {val_data()} > {w / 'teacher_eval.json'}"
    assert len(lines) == 1 + 5 + 6
    assert not w.exists()  # a dry run writes nothing


# ------------------------------------------------------------------------------- a real local run
@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipe")
    f = base / "p.yaml"
    f.write_text(pipeline_yaml(base / "w"))
    r = kdpipe_run(str(f))
    assert r.returncode == 0, r.stderr
    return f, base / "w", r


def test_run_equals_the_steps_by_hand(local_run, tmp_path):
    f, w, r = local_run
    assert "$ kdpipe cache-teacher" in r.stderr and "$ kdpipe distill" in r.stderr
    ref_cache = tmp_path / "cache"
    run_ok(
        ["cache-teacher", teacher(), "--data", train_data(), "--out", str(ref_cache), "--views", "2"]
        + ["--dtype", "float32", "--vec-dtype", "float32", "--threads", "1", "--no-progress"]
    )
    same_cache(w / "cache", ref_cache)
    assert kc.verify(w / "cache") == []
    run_ok(
        ["distill", "--cache", str(ref_cache), "--data", train_data(), "--val-data", val_data()]
        + ["--out", str(tmp_path / "kd"), "--student", "resnet8", "--epochs", "1", "--batch-size", "32"]
        + ["--lr", "0.05", "--workers", "0", "--threads", "1", "--method", "kd", "--no-progress"]
    )
    same_student(w / "kd", tmp_path / "kd")
    # evaluate: the JSON of `kdpipe evaluate`, and the table shows it
    ev = json.loads((w / "kd" / "eval.json").read_text())
    ref = json.loads(run_ok(["evaluate", str(tmp_path / "kd" / "student.onnx"), "--data", val_data()]).stdout)
    assert ev.pop("model") == str(w / "kd" / "student.onnx")
    ref.pop("model")
    assert ev == ref
    teacher_ev = json.loads((w / "teacher_eval.json").read_text())
    assert f"{ev['top1']:.2f}" in r.stdout and f"{teacher_ev['top1']:.2f}" in r.stdout
    assert "student kd (resnet8, kd)" in r.stdout


def test_rerun_skips_complete_steps(local_run):
    f, w, _ = local_run
    before = (w / "kd" / "summary.json").stat().st_mtime_ns
    r = kdpipe_run(str(f))
    assert r.returncode == 0, r.stderr
    assert "skip cache-teacher:" in r.stderr and "skip distill kd:" in r.stderr
    assert "skip evaluate teacher:" in r.stderr and "$ " not in r.stderr
    assert (w / "kd" / "summary.json").stat().st_mtime_ns == before
    r = kdpipe_run(str(f), "--dry-run")
    assert all(line.startswith("# done (skipped): kdpipe ") for line in r.stdout.strip().splitlines())


def test_half_done_steps_resume(local_run, tmp_path):
    f, w, _ = local_run
    w2 = tmp_path / "w2"
    shutil.copytree(w, w2)
    # a cache-teacher killed after its first chunk: one journal line, no COMPLETE.json
    shard = w2 / "cache" / "shards" / "00000-of-00001"
    lines = (shard / "journal.jsonl").read_text().splitlines()
    (shard / "journal.jsonl").write_text(lines[0] + "\n")
    (shard / "COMPLETE.json").unlink()
    # a distill killed after its last checkpoint, before its summary and export
    for name in ("summary.json", "student.onnx", "eval.json"):
        (w2 / "kd" / name).unlink()
    r = kdpipe_run(str(f), "--set", f"workdir={w2}", "--dry-run")
    assert r.stdout.splitlines()[0].startswith("# resumes: kdpipe cache-teacher")
    assert r.stdout.splitlines()[1].startswith("# resumes: kdpipe distill") and "--resume" in r.stdout
    r = kdpipe_run(str(f), "--set", f"workdir={w2}")
    assert r.returncode == 0, r.stderr
    assert "resume cache-teacher:" in r.stderr and "resume distill kd:" in r.stderr
    same_cache(w2 / "cache", w / "cache")
    same_student(w2 / "kd", w / "kd")
    ev2, ev = (json.loads((d / "kd" / "eval.json").read_text()) for d in (w2, w))
    assert ev2["top1"] == ev["top1"] and ev2["model"] == str(w2 / "kd" / "student.onnx")


def test_a_cache_made_otherwise_is_refused(local_run):
    f, w, _ = local_run
    r = kdpipe_run(str(f), "--set", "cache.views=3", "--dry-run")
    assert r.returncode == 2 and "holds 2 view(s) per sample, the pipeline asks for 3" in r.stderr
    r = kdpipe_run(str(f), "--set", "cache.shards=2", "--dry-run")
    assert r.returncode == 2 and "started with 1 shard(s)" in r.stderr


def test_shipped_pipelines_validate():
    """Every YAML under pipelines/ (not the cluster templates) passes the schema and plans."""
    files = sorted(p for p in (REPO / "pipelines").glob("*.yaml"))
    assert {p.name for p in files} >= {"demo.yaml", "cifar-wrn.yaml", "imagenet-resnet.yaml", "sweep.yaml"}
    for p in files:  # the recipes' teachers and datasets are the user's: point them at the test ones
        sets = [f"teacher.onnx={teacher()}", "teacher.card=null", f"data.train={train_data()}"]
        sets += [f"data.val={val_data()}", "workdir=/nonexistent-kdpipe-dry-run"]
        sets += [f"evaluate.data={val_data()}"] if "evaluate:" in p.read_text() else []
        r = run_cli(["run", str(p), "--dry-run", *(w for s in sets for w in ("--set", s))])
        assert r.exit_code == 0, (p, r.stderr)
        assert r.stdout.count("kdpipe distill") >= 2, (p, r.stdout)


def test_slurm_dry_run_and_a_missing_sbatch(tmp_path):
    f = tmp_path / "p.yaml"
    extra = "    - name: ddp\n      method: at\n      nproc: 2\n"
    slurm = (
        'slurm:\n  partition: gpu\n  time: "02:00:00"\n  distill:\n    gpus: 2\n    extra: ["--qos=high"]\n'
    )
    f.write_text(pipeline_yaml(tmp_path / "w", extra_students=extra, shards=3) + slurm)
    r = run_ok(["run", str(f), "--executor", "slurm", "--dry-run"])
    lines = r.stdout.splitlines()
    assert lines[0] == f"sbatch --array=0-2 {tmp_path / 'w' / 'slurm' / 'cache.sbatch'}"
    assert lines[1].endswith('--shard "${SLURM_ARRAY_TASK_ID}/3" --no-progress')
    ddp = next(ln for ln in lines if "--out " + str(tmp_path / "w" / "ddp") in ln)
    assert (
        ddp.startswith("#   torchrun --standalone --nproc_per_node 2 -m kdpipe distill ")
        and "--resume" in ddp
    )
    assert "sbatch '--dependency=afterok:<cache>' --kill-on-invalid-dep=yes" in r.stdout
    assert not (tmp_path / "w").exists()
    r = subprocess.run(
        [sys.executable, "-m", "kdpipe", "run", str(f), "--executor", "slurm"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(tmp_path / "empty")},
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "kdpipe: error: --executor slurm: squeue not found on PATH; run this where Slurm's commands are"
    ]


def test_a_failing_step_stops_the_pipeline(local_run, tmp_path):
    f, w, _ = local_run
    sets = ["--set", f"workdir={tmp_path / 'w3'}", "--set", f"cache.path={w / 'cache'}"]
    r = kdpipe_run(str(f), *sets, "--set", "distill.students.0.student=no_such_net")
    assert r.returncode == 1, r.stderr
    assert "skip cache-teacher:" in r.stderr and "no_such_net" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("kdpipe: error: step 'distill kd' failed (exit 2)")
    assert not (tmp_path / "w3" / "teacher_eval.json").exists()  # nothing after the failure ran


def test_nproc_runs_the_student_with_torchrun(local_run, tmp_path):
    f, w, _ = local_run
    sets = ["--set", f"workdir={tmp_path / 'w4'}", "--set", f"cache.path={w / 'cache'}"]
    sets += ["--set", "distill.students.0.nproc=2", "--set", "evaluate.teacher=false"]
    r = kdpipe_run(str(f), *sets)
    assert r.returncode == 0, r.stderr
    assert "$ torchrun --standalone --nproc_per_node 2 -m kdpipe distill " in r.stderr
    summary = json.loads((tmp_path / "w4" / "kd" / "summary.json").read_text())
    assert world_sizes(summary) == [2]
    assert json.loads((tmp_path / "w4" / "kd" / "eval.json").read_text())["top1"] == summary["last_top1"]
