"""Process-wide CPU allocator setting for training and benchmark commands.

glibc's malloc serves every block over its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it with
``munmap`` on free. A CPU train step of the paper config allocates and frees such activations thousands of times, so
each one is faulted in and zeroed by the kernel again: at batch 4 with LPIPS that was 7.6M page faults and about 30 s
of the 68 s step in the kernel. Serving large blocks from the heap and never trimming it lets freed activations be
reused as they are (0.1M faults, 48 s), at the price of a resident set that stays at its peak (+11% there).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["reuse_freed_cpu_memory"]

logger = logging.getLogger(__name__)

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def _glibc():
    """The process's C library when it is glibc (``mallopt`` with glibc's meaning), else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl and others: their mallopt, if any, is a stub or means something else
    return libc


def reuse_freed_cpu_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel: no ``mmap`` for large blocks
    (``M_MMAP_MAX = 0``) and no trimming of the heap (``M_TRIM_THRESHOLD = -1``), as ``mallopt(3)`` documents.

    Call it once at the start of a process that trains or benchmarks on the CPU (the ``vfmtok`` command does, unless
    given ``--system-malloc``); it changes the whole process and cannot be undone. Returns whether it took effect:
    ``False`` off Linux/glibc, where nothing is changed. CUDA memory is not affected."""
    libc = _glibc()
    if libc is None:
        logger.debug("reuse_freed_cpu_memory: not glibc; allocator left as it is")
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    if not applied:
        logger.warning("reuse_freed_cpu_memory: mallopt refused part of the setting (M_MMAP_MAX = 0, "
                       "M_TRIM_THRESHOLD = -1); freed memory may still go back to the kernel")
    return applied
