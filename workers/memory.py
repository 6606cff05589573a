"""Keep freed memory in the process for the next step instead of handing it back to the kernel.

Every step and every fetch allocates the same large buffers again: the slices a shard
sends, the arrays the coordinator reads them into, the 1 MiB messages of a gradient
stream. glibc's malloc serves blocks above its mmap threshold (128 KiB at first, adjusted
upwards as blocks are freed) with fresh mappings and gives the top of its heaps back to
the kernel once more than twice that is free. So each step touched new pages, and a page
fault costs more in a virtual machine than copying the page: a 4 MB gradient call spent
about a third of its time faulting (bench/RESULTS.md: 11.3 -> 6.6 ms, compute excluded).

With a fixed mmap threshold of 16 MiB and a trim threshold of 64 MiB, blocks of a
million-parameter model's size are reused from the heap. The price: freed blocks stay
resident, up to the recent peak of each malloc arena (glibc gives threads arenas of their
own, so a process with many busy threads may keep several such peaks); blocks of 16 MiB
and more are still mapped and unmapped each time. An operator's own settings win: nothing
changes if MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ is set, or GLIBC_TUNABLES sets
glibc.malloc.mmap_threshold or glibc.malloc.trim_threshold; other C libraries are left alone.

This changes the whole process for good, so it is called where a process starts: the
server's `serve`, the CLI's embedded coordinator, the benchmarks, and each shard actor.
"""
from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 16 << 20
TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3        # <malloc.h>


def operator_settings() -> bool:
    """Whether the environment already tunes glibc's malloc thresholds."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return ("MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
            or "glibc.malloc.mmap_threshold" in tunables or "glibc.malloc.trim_threshold" in tunables)


def keep_freed_memory() -> bool:
    """Set this process's malloc thresholds (see the module doc); True if they were set."""
    if operator_settings():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt           # glibc only; musl and macOS lack it
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
