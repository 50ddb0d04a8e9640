"""`kdpipe doctor` reports what really loads; user mistakes end as one line without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys


def kdpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdpipe", *args], capture_output=True, text=True)


def test_doctor_reports_native_ops_and_a_provider_that_loads() -> None:
    r = kdpipe("doctor", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["native"] is True
    assert info["native_threads"] >= 1
    prov = info["onnxruntime_providers"]
    assert prov["loads"]["CPUExecutionProvider"] is True
    # whatever is listed, only a provider that created a session counts as loading
    assert set(prov["loads"]) == set(prov["listed"])


def test_user_mistakes_are_one_line(tmp_path) -> None:
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(b"not an onnx file")
    cases = [
        ("inspect", str(tmp_path / "missing.onnx")),
        ("inspect", str(bad)),
        ("cache", "info", str(tmp_path / "nocache")),
        ("cache-teacher", str(bad), "--data", "animals", "--out", str(tmp_path / "c")),
        ("distill", "--data", "animals", "--out", str(tmp_path / "r")),
    ]
    for args in cases:
        r = kdpipe(*args)
        assert r.returncode != 0, args
        assert "Traceback" not in r.stderr, (args, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("kdpipe: error:"), (args, r.stderr)
