"""How many heaps glibc's malloc may keep in a gateway process.

A gateway worker's resident memory grew under load although nothing it
keeps grows: glibc's malloc gives each thread that allocates its own heap
(an "arena"; up to 8 per core), and memory freed inside an arena stays
with that arena. A worker has the event loop's thread and the executor
threads of `asyncio.to_thread`; what churns in them is short-lived C memory
(SQLite's page caches, one connection per thread; message buffers; objects
over 512 bytes), and a block of it that moves from one arena to another
leaves the first one's memory behind, resident. Measured under
`bench/soak.py` (2 workers, 6 minutes, a flood of never-seen sources and
mixed mail, debug build): worker 0's RssAnon grew 4.1 MB over the second
half while the Python heap stayed flat (tracemalloc; the same 41 pymalloc
arenas) and glibc's bytes in use grew 0.8 MB; nine arenas held 36 MB for
28 MB in use. With two arenas the gateway's RssAnon grew 2.0-2.2 % over
the second half (three soaks) instead of 3.3-3.5 % (two), at the same
throughput; what it still gains is free memory the two arenas hold (one
malloc_trim(0) at the end brought each worker below its midpoint).

`limit_arenas` sets the limit (mallopt M_ARENA_MAX) before the workers
fork; an operator's own ``MALLOC_ARENA_MAX`` or ``GLIBC_TUNABLES`` wins.

Trusts: the C library the interpreter runs on; where it has no mallopt
(musl, macOS) nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

__all__ = ["ARENAS", "limit_arenas"]

# mallopt(3)'s parameter number for the arena limit (glibc's <malloc.h>).
_M_ARENA_MAX: Final = -8
# Arenas a gateway process may have: the main one and one its threads share.
ARENAS: Final = 2


def limit_arenas(n: int = ARENAS) -> bool:
    """At most `n` glibc malloc arenas in this process and the workers it forks.

    Left alone when the operator chose (the environment has
    ``MALLOC_ARENA_MAX`` or ``GLIBC_TUNABLES``), or where the C library has
    no mallopt. Call it before any thread allocates: arenas that exist
    stay. True when the limit was set here.
    """
    if "MALLOC_ARENA_MAX" in os.environ or "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, n) == 1)
