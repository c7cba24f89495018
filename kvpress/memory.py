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

A release cannot return a page that a later, smaller allocation reused in part, so a cache that keeps growing still
left the process 6% larger than its own growth after 10,000 tokens. Storage that rebuilds large tensors of ever
new sizes (ragged storage's folds and eviction rebuilds) therefore allocates them with :func:`os_backed_empty`:
from an anonymous memory map of their own, never from the heap, so freeing one unmaps it whole at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import mmap
import sys

import torch

RELEASE_EVERY = 64  # forwards between two releases (a release costs about a millisecond)
OS_BACKED_MIN_BYTES = 128 << 10  # smaller ones come from the heap (a map costs ~20 us); glibc's initial mmap threshold


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


def os_backed_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised tensor of ``shape``; on CPU and from :data:`OS_BACKED_MIN_BYTES` up, backed by an anonymous
    memory map of its own, returned to the operating system whole when the tensor is freed (elsewhere
    ``torch.empty``). A map takes whole pages (under 4 KiB more than the tensor on Linux/x86). Its storage cannot
    be resized: write into it (``out=``, slicing), never ``resize_`` it."""
    device = torch.device(device)
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if device.type != "cpu" or nbytes < OS_BACKED_MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    # torch.frombuffer keeps the map alive for as long as the tensor's storage; its deallocation unmaps it.
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=numel).view(shape)
