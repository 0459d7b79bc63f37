"""Process-wide settings for a long-running streaming process (``asr-live``, a server that calls
:func:`asr.stream.step_batch` for many streams).

Two costs come from the Python process rather than from the model:

- **Garbage collection.** Each call leaves a few thousand new Python objects alive until the next
  one, and every few dozen calls the interpreter runs a full collection that walks every object
  alive: ~330k of them after torch and the model are loaded, ~150-300 ms per collection on two
  CPU cores, against 40 ms of audio per call. ``gc.freeze()`` after start-up moves those
  objects out of the collector's sight; later garbage is still collected.
- **Memory returned to the OS and taken back.** At 100 streams every call makes a new wkv state
  of 8 MB per block (65 MB for the bundled model: states are values, ``step`` never writes into
  the one it is given) and frees the previous one. glibc's malloc hands freed memory at the top of
  its heap back to the OS, so the next call maps it again and the kernel zeroes every page:
  ~4-8 ms of a ~35 ms call at 100 streams on 2 threads. ``mallopt`` keeps freed memory in the process (its resident size stays at its peak).

Neither changes any result. Call :func:`tune_for_streaming` once after loading the model.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

__all__ = ["tune_for_streaming"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>: free memory above this at the heap's top goes back to the OS
_M_MMAP_THRESHOLD = -3  # allocations at least this large get their own mapping, unmapped on free


def tune_for_streaming(keep_freed_memory: bool = True) -> bool:
    """``gc.freeze()``, and with ``keep_freed_memory`` on glibc, malloc settings that keep freed
    memory in the process (module docstring). Returns whether malloc was tuned (False on other
    platforms or C libraries, where only the garbage collector is)."""
    gc.freeze()
    if not keep_freed_memory or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    # Blocks up to 1 GB from the heap rather than their own mappings (older glibc refuses more
    # than 32 MB: then that), and the heap's free top kept up to 2 GB.
    ok = mallopt(_M_MMAP_THRESHOLD, 1024**3) == 1 or mallopt(_M_MMAP_THRESHOLD, 32 * 1024**2) == 1
    return mallopt(_M_TRIM_THRESHOLD, 2 * 1024**3 - 1) == 1 and ok
