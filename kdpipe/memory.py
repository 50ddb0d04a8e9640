"""Keep freed memory in the process: glibc malloc settings for loops that reallocate the same buffers.

A training step (or a cache-teacher batch) allocates and frees the same large tensors every iteration.
With glibc's defaults, blocks above the dynamic mmap threshold are ``mmap``-ed and ``munmap``-ed each
time, and free memory at the top of the heap is returned to the OS once it exceeds the trim threshold,
so the next iteration page-faults all of it in again. On virtual machines a page fault is expensive:
on the project's 2-core VM these faults cost a quarter of a WRN-16-1 CPU training step
(docs/benchmarks.md). ``keep_freed_memory()`` raises both thresholds so that freed blocks are reused,
the way the CUDA caching allocator reuses device memory; the price is that the process keeps its peak
heap. ``one_arena=True`` (cache-teacher) also limits malloc to one arena: a thread's own arena is
carved into 64 MiB heaps that glibc unmaps as soon as one is empty, whatever the thresholds, so
cache-teacher's preparation thread, whose 12 MiB input blocks the main thread frees, faulted its
memory in again on every chunk (27-31 ms of CPU per chunk of 1024 CIFAR images instead of 3-9 ms).
It does nothing off glibc, and ``KDPIPE_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # bytes: glibc's upper limit for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = (1 << 31) - 1  # bytes of free heap top kept (mallopt takes a C int)

_mallopt: Any = None  # libc's mallopt, or False where there is none / the settings are turned off
_one_arena = False


def _libc_mallopt() -> Any:
    global _mallopt
    if _mallopt is None:
        _mallopt = False
        if os.environ.get("KDPIPE_KEEP_FREED_MEMORY", "1") != "0" and sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
                fn.argtypes = (ctypes.c_int, ctypes.c_int)
                fn.restype = ctypes.c_int
                _mallopt = fn
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                pass
    return _mallopt


@functools.cache
def _thresholds() -> bool:
    mallopt = _libc_mallopt()
    return bool(mallopt) and all(
        mallopt(param, value)
        for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    )


def keep_freed_memory(one_arena: bool = False) -> bool:
    """Apply the malloc settings (once per process); True when they are in effect (glibc Linux only).

    Call it before the loop: blocks of up to 32 MiB then come from the heap and freed heap memory (up
    to 2 GiB at the top) stays mapped for reuse. ``one_arena`` (call it before starting threads):
    threads started later share the main arena; cache-teacher uses it (measured there), distill does
    not (not measured to help torch's threads). Forked children (DataLoader workers) inherit it.
    """
    global _one_arena
    if not _thresholds():
        return False
    if one_arena and not _one_arena:
        _one_arena = bool(_libc_mallopt()(_M_ARENA_MAX, 1))
        return _one_arena
    return True
