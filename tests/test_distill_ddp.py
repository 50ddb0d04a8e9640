"""torchrun DDP on CPU (gloo), two real processes: one short epoch from the cache completes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _distill import cached, distill_args, read_jsonl, subprocess_env, val_data


@pytest.mark.slow  # two processes that each import torch and join a gloo group: ~10-15 s on 2 cores
def test_torchrun_two_processes_gloo(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = distill_args(out, "--method", "afd+kd", "--val-data", val_data(), "--device", "cpu", "--no-export",
                        cache_path=cached(2, "float16"))  # fmt: skip
    args[args.index("--batch-size") + 1] = "16"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kdpipe", *args]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["effective_batch"] == 32
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["effective_batch"] == 32
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 1 and "val_top1" in metrics[0]  # written once, by rank 0
    assert r.stderr.count("epoch 1: loss") == 1
