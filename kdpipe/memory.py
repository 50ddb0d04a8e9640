"""Keep freed memory in the process: glibc malloc settings for loops that reallocate the same buffers.

A training step (or a cache-teacher batch) allocates and frees the same large tensors every iteration.
With glibc's defaults, blocks above the dynamic mmap threshold are ``mmap``-ed and ``munmap``-ed each
time, and free memory at the top of the heap is returned to the OS once it exceeds the trim threshold,
so the next iteration page-faults all of it in again. On virtual machines a page fault is expensive:
on the project's 2-core VM these faults cost a quarter of a WRN-16-1 CPU training step
(docs/benchmarks.md). ``keep_freed_memory()`` raises both thresholds so that freed blocks are reused,
the way the CUDA caching allocator reuses device memory; the price is that the process keeps its peak
heap. It also limits malloc to one arena: a thread's own arena is carved into 64 MiB heaps that glibc
unmaps as soon as one is empty, whatever the thresholds, so cache-teacher's preparation thread, whose
12 MiB input blocks are freed by the main thread, faulted its memory in again on every chunk (27-31 ms
of CPU per chunk of 1024 CIFAR images instead of 5-9 ms). It does nothing off glibc, and
``KDPIPE_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # bytes: glibc's upper limit for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = (1 << 31) - 1  # bytes of free heap top kept (mallopt takes a C int)

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the malloc settings once per process; True when they are in effect (glibc Linux only).

    Call it before the loop and before starting threads: blocks of up to 32 MiB then come from the
    heap, freed heap memory (up to 2 GiB at the top) stays mapped for reuse, and threads started later
    share the main arena. Forked children (DataLoader workers) inherit it.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("KDPIPE_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _applied = all(
        mallopt(param, value)
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_ARENA_MAX, 1),
        )
    )
    return _applied
