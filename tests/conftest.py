"""Session fixtures shared by several test files."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A real single-node Slurm (tests/_slurm.py) for the session; skips with one line where there is none."""
    from _slurm import LocalSlurm, why_unavailable

    # KDPIPE_REQUIRE_SLURM=1 (set by .ci/run, which runs as root): no Slurm is a failure, not a skip
    give_up = pytest.fail if os.environ.get("KDPIPE_REQUIRE_SLURM") == "1" else pytest.skip
    why = why_unavailable()
    if why:
        give_up(f"no Slurm: {why}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception as e:  # a machine that has the packages but cannot run the daemons
        cluster.stop()
        give_up(f"no Slurm: the daemons did not start ({e})")
    yield cluster
    cluster.stop()
