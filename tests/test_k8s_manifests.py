"""The Kubernetes manifests of pipelines/cluster/ validated offline with kubernetes-validate against a
pinned Kubernetes version (strict: unknown fields fail), plus the consistency kdpipe relies on.

They were not run on a real cluster here (docs/cluster.md says so).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

K8S_VERSION = "1.33.0"
CLUSTER = Path(__file__).resolve().parents[1] / "pipelines" / "cluster"
VALIDATE = str(Path(sys.executable).with_name("kubernetes-validate"))


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [VALIDATE, "-k", K8S_VERSION, "--strict", str(path)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("name", ["k8s-cache-teacher.yaml", "k8s-distill.yaml"])
def test_manifest_is_valid(name):
    r = validate(CLUSTER / name)
    assert r.returncode == 0, r.stdout + r.stderr
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]
    assert r.stdout.count("passed") == len(docs), r.stdout


def test_the_validator_rejects_a_wrong_field(tmp_path):
    """A negative control: the strict schema really is applied."""
    text = (CLUSTER / "k8s-cache-teacher.yaml").read_text().replace("completions: 8", "completionz: 8")
    (tmp_path / "bad.yaml").write_text(text)
    r = validate(tmp_path / "bad.yaml")
    assert r.returncode != 0 and "completionz" in r.stdout + r.stderr


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_cache_job_matches_kdpipe_shard_discovery():
    job = yaml.safe_load((CLUSTER / "k8s-cache-teacher.yaml").read_text())
    spec = job["spec"]
    (c,) = spec["template"]["spec"]["containers"]
    assert spec["completionMode"] == "Indexed"
    assert int(_env(c)["KDPIPE_NUM_SHARDS"]) == spec["completions"]
    assert c["command"][:2] == ["kdpipe", "cache-teacher"] and "--shard" not in c["command"]
    from kdpipe.distributed import discover_shard

    n = spec["completions"]
    got = [discover_shard(None, {"JOB_COMPLETION_INDEX": str(i), **_env(c)}) for i in range(n)]
    assert [(s.index, s.count, s.source) for s in got] == [(i, n, "kubernetes") for i in range(n)]


def test_distill_job_rendezvous_is_consistent():
    svc, job = [d for d in yaml.safe_load_all((CLUSTER / "k8s-distill.yaml").read_text()) if d]
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert svc["spec"]["clusterIP"] == "None" and pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert int(_env(c)["NNODES"]) == job["spec"]["completions"] == job["spec"]["parallelism"]
    cmd = " ".join(c["args"])
    host = re.search(r"--rdzv_endpoint (\S+):(\d+)", cmd)
    assert host and host.group(1) == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(host.group(2)) == svc["spec"]["ports"][0]["port"]
    assert "-m kdpipe distill" in cmd and "--resume" in cmd
