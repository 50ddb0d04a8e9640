"""Session fixtures shared by several test files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A real single-node Slurm (tests/_slurm.py) for the session; skips with one line where there is none."""
    from _slurm import LocalSlurm, why_unavailable

    why = why_unavailable()
    if why:
        pytest.skip(f"no Slurm: {why}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception as e:  # a machine that has the packages but cannot run the daemons
        cluster.stop()
        pytest.skip(f"no Slurm: the daemons did not start ({e})")
    yield cluster
    cluster.stop()
