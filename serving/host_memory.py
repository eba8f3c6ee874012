"""How the C allocator treats the big temporaries of serving on a CPU.

A prefill chunk of T tokens makes blocks of a few to tens of megabytes per layer (the (3d, T) input
projection, the FFT spectra, the MLP's (T, 4d) activation), frees them, and makes them again for
the next layer and the next step. glibc's malloc, as it starts, hands such blocks to the kernel
and takes them back each time:

    - a block at or above its mmap threshold is mapped on malloc and unmapped on free (the
      threshold starts at 128 KiB and follows the largest block freed, up to 32 MiB);
    - free memory above its trim threshold (twice the mmap threshold) at the top of the heap is
      returned to the kernel.

Either way the next block of that size is fresh memory, and every 4 KiB page of it costs a page
fault (the kernel zero-fills it) when first written. Whether a block is fresh depends on the
process's history: two batches of 16 requests x 8192 tokens on the 2-core test machine took 14.9 s
with 51 thousand faults and 17.7 s with 878 thousand; under the policy below, 15.0 s and 14.7 s with
4,141 and 49 (benchmarks/results/serve_cpu_r16_p8192_malloc.json).

vLLM's CPU backend expects a caching allocator: it preloads tcmalloc into its engine processes when
its wheel ships one, and warns when it is missing. Where it is not, `retain_freed_memory` gives glibc
the same policy through mallopt(3):

    M_MMAP_THRESHOLD = 32 MiB    blocks below it come from the heap (the largest value glibc takes
                                 on 64-bit: the mixer's and MLP's blocks at vLLM's CPU token budget
                                 of 4096 are 4-17 MB)
    M_TRIM_THRESHOLD = 2 GiB - 1 freed heap memory is kept for reuse, not returned to the kernel

The cost is tcmalloc's: the process keeps its peak heap. It is left alone when the user has chosen
(HYENA_RTF_RETAIN_FREED_MEMORY=0, GLIBC_TUNABLES with a malloc setting, or another allocator
loaded), and when the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (<malloc.h>)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int
SWITCH = "HYENA_RTF_RETAIN_FREED_MEMORY"
ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def user_choice() -> str | None:
    """Why the allocator is left as it is (the user chose, or it is not glibc's), or None."""
    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    maps = loaded_libraries()
    if any(name in maps for name in ALLOCATORS):
        return "another allocator is loaded"
    if platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    return None


def loaded_libraries() -> str:
    """The shared objects mapped into this process (/proc/self/maps), or "" where unreadable. What is
    loaded counts, not LD_PRELOAD: vLLM sets LD_PRELOAD for the processes it starts after this one."""
    try:
        with open("/proc/self/maps") as f:
            return f.read()
    except OSError:
        return ""


def retain_freed_memory() -> str:
    """Set the module docstring's mallopt(3) policy in this process, unless `user_choice` says not
    to. Returns what was done, for the log."""
    why_not = user_choice()
    if why_not is None:
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD):
            return f"freed memory retained (mallopt: mmap threshold {MMAP_THRESHOLD >> 20} MiB, no trimming)"
        why_not = "mallopt refused the setting"
    return f"left as it is: {why_not}"
