"""Keep freed memory in the process for the next step instead of handing it back to the kernel.

Every step and every fetch allocates the same large buffers again: the slices a shard
sends, the arrays the coordinator reads them into, the 1 MiB messages of a gradient
stream. glibc's malloc serves blocks above its mmap threshold (128 KiB at first, adjusted
upwards as blocks are freed) with fresh mappings and gives the top of its heaps back to
the kernel once more than twice that is free. So each step touched new pages, and a page
fault costs more in a virtual machine than copying the page: the coordinator's 4 MB gradient
fetch spent about a third of its time faulting (W4 in bench/RESULTS.md: 11.3 -> 7.1 ms).

With a fixed mmap threshold of 16 MiB and a trim threshold of 64 MiB, blocks of a
million-parameter model's size are reused from the heap. The price: a process keeps up to
its recent peak of such blocks resident after it frees them (blocks of 16 MiB and more are
still mapped and unmapped each time). An operator's own settings win: nothing changes if
MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES' malloc entries are set,
and other C libraries are left alone.
"""
from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 16 << 20
TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3        # <malloc.h>


def operator_settings() -> bool:
    """Whether the environment already tunes glibc's malloc thresholds."""
    return ("MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


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
