"""The C allocator's policy while a pass streams large buffers through host memory (glibc only; a no-op elsewhere).

glibc serves a request below its mmap threshold from the heap, and raises that threshold (up to 32 MiB) each time
it frees a larger mmapped block — so once the first decoder layer's tensors are freed, the next layer's weights and
temporaries land on the heap, where freed chunks stay resident behind the live ones (the masks, the activations)
and `malloc_trim` cannot return them all. A streamed pass of SmolLM2-135M then peaked at 0.75x the model's bytes
above the imports, 0.53x with `MALLOC_MMAP_THRESHOLD_` set by hand (bench/prune/results_stream.md). Users do not
set it, so the streamed pass sets the same policy itself through `mallopt` for its duration: buffers of at least
1 MiB are mmapped and go back to the OS when freed, and the heap top is trimmed past 128 KiB (glibc's defaults
before its dynamic adjustment), after a `malloc_trim`: glibc mmaps only what its free chunks cannot serve. glibc
cannot switch its dynamic adjustment back on, so afterwards the thresholds are set to where it ends up in a process
that frees large tensors (mmap 32 MiB, trim 64 MiB).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
STREAMING = {"mmap": 1 << 20, "trim": 128 << 10}
AFTER = {"mmap": 32 << 20, "trim": 64 << 20}  # glibc's DEFAULT_MMAP_THRESHOLD_MAX (64-bit) and twice it


def glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc (it has `gnu_get_libc_version`), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def set_thresholds(mmap: int, trim: int, libc: ctypes.CDLL | None = None) -> bool:
    """Set glibc's mmap and trim thresholds (bytes); True when glibc accepted both, False without glibc."""
    libc = libc or glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap)) & bool(libc.mallopt(M_TRIM_THRESHOLD, trim))


def trim() -> bool:
    """Hand free heap pages back to the OS (glibc's `malloc_trim(0)`); False without glibc."""
    libc = glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


class StreamingPolicy(contextlib.ContextDecorator):
    """Within: the streaming thresholds (logged); after: the steady-state ones, and one trim. A no-op (logged at
    debug level) where the C library is not glibc."""

    def __enter__(self) -> bool:
        self.applied = set_thresholds(STREAMING["mmap"], STREAMING["trim"])
        if self.applied:  # glibc mmaps only what its free chunks cannot serve: hand those back first
            trim()
            log.info("host memory: glibc mmap threshold %d KiB, trim threshold %d KiB for the streamed pass "
                     "(freed layer buffers go back to the OS)", STREAMING["mmap"] >> 10, STREAMING["trim"] >> 10)
        else:
            log.debug("host memory: the C library is not glibc (or refused mallopt); allocator left as it is")
        return self.applied

    def __exit__(self, *exc) -> bool:
        if self.applied:
            set_thresholds(AFTER["mmap"], AFTER["trim"])
            trim()
        return False
