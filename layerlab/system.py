"""Process-wide settings for fast CPU training, applied by the process owner (the CLI, the benchmarks).

glibc's malloc serves every allocation above its *dynamic* mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it to the OS on free, so a training step whose activations sit near that size (a
full-width ResNet-18 at batch 128: 32 MiB per first-stage activation) pays thousands of page faults per
tensor, every step, and CURE (more live graphs) pays most. Keeping large blocks on the heap and not trimming
it removes those faults; PyTorch's CPU tuning guide gets the same effect from jemalloc or TCMalloc. The
settings change how memory is obtained, never a computed value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_MAX = -4
ENV_SWITCH = "LAYERLAB_MALLOC"  # "default" leaves glibc's malloc as it is


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the heap instead of mmap/munmap per large tensor (glibc only; a no-op elsewhere or
    when ``LAYERLAB_MALLOC=default``). Returns whether the settings were applied."""
    if os.environ.get(ENV_SWITCH, "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
