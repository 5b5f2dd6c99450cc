"""Giving the C heap's free memory back to the system, in a long-running worker.

A gateway worker's resident memory grows under load although nothing it
keeps grows: glibc's malloc holds on to memory that was freed inside its
heaps (one heap, an "arena", per thread that allocates: the event loop's
and each `asyncio.to_thread` executor thread's), and hands back to the
system only a free stretch at a heap's top. What churns there is short-lived
C memory: SQLite's page caches (one connection per thread, `kithmail.db`,
refilled whenever another connection writes), message buffers read and
written in the executor threads, objects over 512 bytes. Measured under
`bench/soak.py` (2 workers, 6 minutes, flood of never-seen sources and
mixed mail, debug build): between the midpoint and the end worker 0's
RssAnon grew 4.1 MB while the Python heap (tracemalloc, `sys._debugmallocstats`:
the same 41 pymalloc arenas) and glibc's bytes in use (+0.8 MB) stayed
nearly flat; one `malloc_trim(0)` took 3.3 MB of it back in about a
millisecond.

`release_free_memory` calls glibc's `malloc_trim(0)`, which returns every
free page inside every arena, not only a heap's top; `release_periodically`
does it every `RELEASE_EVERY_S` seconds in a worker's event loop.

Trusts: the C library the interpreter runs on; where it has no
`malloc_trim` (musl, macOS) both do nothing and say so once in the log.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
from collections.abc import Callable
from typing import Final

__all__ = ["RELEASE_EVERY_S", "release_free_memory", "release_periodically"]

log = logging.getLogger("kithmail.heap")

# Once a minute: a trim costs about a millisecond of the event loop (measured
# with a worker's 36 MB of glibc heap), and a minute's churn is a few MB.
RELEASE_EVERY_S: Final = 60.0


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim(3) from the running process's symbols, or None."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Free pages of the C heap (every glibc arena) back to the system.

    True when some memory was returned; False when none was, or where the
    C library has no malloc_trim.
    """
    trim = _malloc_trim()
    return trim is not None and trim(0) == 1


async def release_periodically(every: float = RELEASE_EVERY_S) -> None:
    """`release_free_memory` every `every` seconds, until cancelled."""
    if _malloc_trim() is None:
        log.info("heap: no malloc_trim in this C library; free memory stays with malloc")
        return
    log.info(
        "heap: free C heap memory goes back to the system every %.0f s (pid %d)", every, os.getpid()
    )
    while True:
        await asyncio.sleep(every)
        release_free_memory()
