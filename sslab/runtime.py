"""Process-wide settings that make CPU training faster."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Stop glibc from returning freed multi-MB blocks to the OS after every step.

    By default glibc serves large tensors with mmap and unmaps them on free, so every training step
    page-faults its activations back in; keeping them in the heap made the small-CNN step ~25% faster
    here (benchmarks/throughput.py --no-tune-malloc to compare). Returns whether the settings took.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # 32 MiB is glibc's ceiling for the mmap threshold on 64-bit systems.
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
