"""Process-wide settings that make CPU training faster."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
CPU_BF16_ENV = "SSLAB_CPU_BF16"


def tune_allocator() -> bool:
    """Stop glibc from returning freed multi-MB blocks to the OS after every step.

    By default glibc serves large tensors with mmap and unmaps them on free, so every training step
    page-faults its activations back in. Raising the mmap threshold to its ceiling (32 MiB) kept the small
    CNN's in the heap (its step ~25% faster); blocks above it, such as a ResNet-18's 64 MiB activations at
    batch 512, were still mapped, and cost it 0.5 million page faults and 1.4 s of kernel time per step.
    So no block is mmapped (glibc still maps one where the heap cannot grow): that step went from 64 to
    96 images/s on an avx512_bf16 CPU, for 0.8 GB more peak memory (benchmarks/throughput.py
    --no-tune-malloc to compare). Returns whether the settings took.
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
    settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_MMAP_MAX, 0))
    return all([bool(mallopt(option, value)) for option, value in settings])


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AVX512-BF16 or AMX on x86, the BF16
    extension on Arm). Elsewhere torch emulates bf16 and a bf16 step ran 11x slower than fp32 (an AVX2
    machine, benchmarks/throughput.py), where on an avx512_bf16 machine it ran 1.6x faster.
    $SSLAB_CPU_BF16 (1 or 0) overrides the check, e.g. to compute the same numbers on every machine."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return x86_bf16_kind() is not None or _arm_bf16()


X86_AMX, X86_AVX512_BF16 = "amx", "avx512_bf16"


def x86_bf16_kind() -> str | None:
    """X86_AMX, X86_AVX512_BF16 or None: how this x86 CPU computes bf16 in hardware, from torch's
    feature probes (the CPU's features, not its name; $SSLAB_CPU_BF16 does not apply)."""
    import torch

    for kind, check in ((X86_AMX, "_is_amx_tile_supported"), (X86_AVX512_BF16, "_is_avx512_bf16_supported")):
        probe = getattr(torch.cpu, check, None)
        if probe is not None and probe():
            return kind
    return None


def _arm_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return any(
                line.startswith("Features") and "bf16" in line.split(":", 1)[1].split() for line in cpuinfo
            )
    except OSError:
        return False
