"""Large CPU buffers reused instead of fresh pages while registration runs (glibc only; a no-op elsewhere).

Why: one evaluation of the objective makes tensors of tens to hundreds of MB (rays x samples along each ray x
batch), frees them, and makes them again on the next of hundreds of evaluations per frame. glibc serves every
allocation above its mmap threshold (at most 32 MiB) with fresh pages from the kernel and hands them back on
free, so each evaluation pays page faults and zeroing for every such buffer. Raising the threshold and the
trim threshold while registration runs keeps freed buffers in the heap for the next evaluation: measured on the
2-core CPU (Testing/benchmarks/results/cpu_buffer_reuse_2026-11-22.md), one automatic start on one thread took
0.78x the time, and a 256 px render + gradient of 3 pairs went from about 300 000 page faults to none once the
heap held its buffers. The results do not change: only where the memory comes from does.

On leaving the outermost :func:`reuse_freed_buffers`, the thresholds go back to the ceilings glibc's own
dynamic thresholds reach in a process that frees large blocks (32 MiB mmap, 64 MiB trim) and the freed memory
goes back to the system (``malloc_trim``), so a host such as 3D Slicer keeps no more than before.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from contextlib import contextmanager

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_DURING = {_M_MMAP_THRESHOLD: 2**31 - 1, _M_TRIM_THRESHOLD: 2**31 - 1}  # the largest values mallopt takes
_AFTER = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20}

_lock = threading.Lock()
_depth = 0


@functools.lru_cache(maxsize=None)
def _glibc():
    """The process's glibc (with mallopt and malloc_trim), or None (macOS, Windows, musl)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def _apply(values: dict[int, int]) -> bool:
    libc = _glibc()
    if libc is None:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in values.items())


def active() -> bool:
    """True while inside :func:`reuse_freed_buffers` on a platform where it does something."""
    return _depth > 0 and _glibc() is not None


@contextmanager
def reuse_freed_buffers(enabled: bool = True):
    """Keep freed large buffers for reuse while the block runs (re-entrant; threads share one setting)."""
    global _depth
    if not enabled:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _apply(_DURING)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _apply(_AFTER):
                _glibc().malloc_trim(0)
