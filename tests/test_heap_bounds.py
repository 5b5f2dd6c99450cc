"""The gateway's C heap stays in a bounded number of glibc malloc arenas (`kithmail.heap`).

What an operator sees is a worker's resident memory. glibc gives every
thread that allocates its own arena (up to 8 per core) and keeps memory
freed in one arena for that arena; `kith serve` limits them to
`kithmail.heap.ARENAS` before its workers fork, unless the operator set
``MALLOC_ARENA_MAX`` (docs/observability.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateway import Gateway, running_gateway

from kithmail.heap import ARENAS

# Eight threads that all allocate at once, as a worker's executor threads
# do under load; then glibc's own account of its arenas (malloc_stats(3)
# writes one "Arena N:" block per arena to stderr).
THREADS = r"""
import ctypes, sys, threading
if sys.argv[1] == "limit":
    from kithmail.heap import limit_arenas
    limit_arenas()
kept = []
all_in = threading.Barrier(8)

def burst():
    freed = [bytearray(4000) for _ in range(2000)]  # past pymalloc: glibc's malloc
    kept.append(bytearray(600))
    all_in.wait()
    freed.clear()

threads = [threading.Thread(target=burst) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ctypes.CDLL(None).malloc_stats()
"""


def arenas(*args: str, env: dict[str, str] | None = None) -> int:
    out = subprocess.run(
        [sys.executable, "-c", THREADS, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    )
    return sum(1 for line in out.stderr.splitlines() if line.startswith("Arena "))


def test_threads_share_the_limited_arenas() -> None:
    # Without the limit, glibc gives the eight threads arenas of their own ...
    assert arenas("none") > ARENAS
    # ... with it, the main arena and the ones the threads share, whatever their number.
    assert arenas("limit") == ARENAS


def test_the_operators_malloc_arena_max_wins() -> None:
    env = {"MALLOC_ARENA_MAX": "3", "PATH": "/usr/bin:/bin"}
    assert arenas("limit", env=env) == 3


def test_kith_serve_limits_the_arenas_of_its_workers(tmp_path: Path) -> None:
    said = f"malloc: at most {ARENAS} arenas per process"

    def ready(gw: Gateway) -> bool:
        return gw.log_text().count("kithmail ready") >= 2

    with running_gateway(tmp_path, sections={"server": {"workers": 2}}) as gw:
        gw.wait_for("both workers", lambda: ready(gw))
        log = gw.log_text()
        # Set once, in the parent, before the fork: the workers inherit it.
        assert log.count(said) == 1, log
        assert log.index(said) < log.index("kithmail ready"), log
