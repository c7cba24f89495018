"""Give memory freed by the cache back to the operating system.

A cache that grows, or is rebuilt by eviction, frees a layer's tensors and allocates slightly larger ones, step
after step. glibc's malloc serves those sizes from its heap once its mmap threshold has risen past them (the
threshold follows the largest block freed), and the freed blocks, each a little too small for the next request,
stay mapped: measured on a 10,000-token soak of the learned scorer's threshold mode, the process held 6-7 MiB more
per 1,000 tokens than the cache (`benchmarks/RESULTS.md`, Soak), and none with the threshold fixed
(``MALLOC_MMAP_THRESHOLD_``), so it is not a leak. ``malloc_trim(0)`` releases such free pages; the patch calls
:func:`release_freed_memory` every :data:`RELEASE_EVERY` forwards. What accumulates between two releases grows with
the layers' size (a rebuild frees a layer's old tensors): with a release every 100 forwards, 5-9 MiB accumulated
between releases at 1,000-1,200 tokens, and each release brought the process back to the same size. Elsewhere than
glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

RELEASE_EVERY = 64  # forwards between two releases (a release costs about a millisecond)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the heap's free pages to the operating system (glibc ``malloc_trim(0)``); ``False`` where there is
    no glibc, or nothing was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
