"""glibc keeps freed memory for reuse (kdpipe.memory), checked through the kernel's page-fault counter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

FAULTS = """
import resource
import numpy as np
from kdpipe.memory import keep_freed_memory
print(keep_freed_memory())
def cycle():
    arrays = [np.ones(1 << 20, dtype=np.float32) for _ in range(50)]  # 50 x 4 MiB, every page touched
    del arrays
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: str) -> tuple[str, int]:
    env = os.environ | {"KDPIPE_KEEP_FREED_MEMORY": keep}
    out = subprocess.run(
        [sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_memory_is_reused_without_page_faults() -> None:
    applied, faults = _faults("1")
    assert applied == "True"
    assert faults < 1000  # 200 MiB reallocated: ~51,000 pages would fault if it had been returned
    applied_off, faults_off = _faults("0")
    assert applied_off == "False"
    assert faults_off > 10 * max(faults, 100)  # the default returns it to the OS: the check can fail


ARENAS = """
import ctypes, sys, threading
import numpy as np
from kdpipe.memory import keep_freed_memory
print(keep_freed_memory(one_arena=sys.argv[1] == "one"))
def work():
    global kept
    kept = np.ones(1 << 20, dtype=np.float32)  # 4 MiB from this thread's arena
t = threading.Thread(target=work)
t.start(); t.join()
ctypes.CDLL("libc.so.6").malloc_stats()  # glibc prints one block per arena to stderr
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_threads_share_the_main_arena() -> None:
    """A second arena's heaps are unmapped when empty, whatever the thresholds: threads must not get one."""

    def arenas(keep: str, mode: str) -> int:
        env = os.environ | {"KDPIPE_KEEP_FREED_MEMORY": keep}
        r = subprocess.run(
            [sys.executable, "-c", ARENAS, mode], env=env, capture_output=True, text=True, check=True
        )
        assert r.stdout.strip() == str(keep == "1")
        return r.stderr.count("Arena ")

    assert arenas("1", "one") == 1
    assert arenas("1", "default") >= 2  # thresholds only: the thread gets its own arena
    assert arenas("0", "one") >= 2  # turned off: glibc's default, so the first check can fail
