"""Who am I in a cluster job: shard discovery for array jobs, rank discovery for torchrun.

Array jobs (one process per shard of the cache): ``--shard i/n`` wins; else Slurm arrays
(``SLURM_ARRAY_TASK_ID`` with ``SLURM_ARRAY_TASK_COUNT`` and ``SLURM_ARRAY_TASK_MIN``); else Kubernetes
indexed jobs (``JOB_COMPLETION_INDEX`` with ``KDPIPE_NUM_SHARDS``, since Kubernetes does not expose the
completion count to the pod); else a single shard (0, 1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from kdpipe.errors import KdpipeError


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based), and where that came from."""

    index: int
    count: int
    source: str

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"i/n"`` (0 <= i < n) into ``(i, n)``."""
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise KdpipeError(f"--shard {text!r}: expected INDEX/COUNT such as 0/8") from None
    if n < 1 or not 0 <= i < n:
        raise KdpipeError(f"--shard {text!r}: need 0 <= INDEX < COUNT and COUNT >= 1")
    return i, n


def discover_shard(flag: str | None = None, env: Mapping[str, str] | None = None) -> Shard:
    """The shard this process should write: from ``--shard``, Slurm, Kubernetes, or (0, 1)."""
    env = os.environ if env is None else env
    if flag:
        i, n = parse_shard(flag)
        return Shard(i, n, "--shard")
    if "SLURM_ARRAY_TASK_ID" in env:
        try:
            task = int(env["SLURM_ARRAY_TASK_ID"])
            lo = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError):
            raise KdpipeError(
                "Slurm array job detected but SLURM_ARRAY_TASK_COUNT is missing or not a number; "
                "pass --shard INDEX/COUNT explicitly"
            ) from None
        i = task - lo
        if not 0 <= i < count:
            raise KdpipeError(
                f"Slurm array task {task} is outside {lo}..{lo + count - 1}: use a contiguous --array "
                "range such as --array=0-7, or pass --shard INDEX/COUNT"
            )
        return Shard(i, count, "slurm")
    if "JOB_COMPLETION_INDEX" in env:
        if "KDPIPE_NUM_SHARDS" not in env:
            raise KdpipeError(
                "Kubernetes indexed job detected (JOB_COMPLETION_INDEX) but KDPIPE_NUM_SHARDS is not set: "
                "set it to the job's .spec.completions"
            )
        i, n = parse_shard(f"{env['JOB_COMPLETION_INDEX']}/{env['KDPIPE_NUM_SHARDS']}")
        return Shard(i, n, "kubernetes")
    return Shard(0, 1, "single")


@dataclass(frozen=True)
class WorldInfo:
    """torchrun's view of this process: rank, local rank and world size (1 process when absent)."""

    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def discover_world(env: Mapping[str, str] | None = None) -> WorldInfo:
    """Read RANK / LOCAL_RANK / WORLD_SIZE as set by torchrun (or Slurm's srun via SLURM_PROCID)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        return WorldInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]))
    return WorldInfo(0, 0, 1)
