"""Free loopback ports for the servers the tests start, without races.

`bind(("127.0.0.1", 0))` hands out a port from the kernel's ephemeral
range, the same range every outgoing connection takes its source port
from. Between the moment a test learns such a port and the moment its
server binds it, any of the thousands of client connections the suite
makes (four pytest processes at once) may have taken it, and the server
fails to start with "address in use" in a test that has nothing wrong.

So ports here come from below the ephemeral range (read from
/proc/sys/net/ipv4/ip_local_port_range), where no connection ever takes
one, and each pytest-xdist worker walks its own slice of that space, so
two workers never hand out the same port. A port is handed out only if
it binds now, for TCP and, when asked, for UDP too (dnsmasq serves both).
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["free_port"]

LOWEST = 10000  # below this are ports services of the machine may own


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _slice() -> range:
    """This process's share of [LOWEST, ephemeral low)."""
    top = _ephemeral_low()
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # "gw3"; "master" alone
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    size = (top - LOWEST) // count
    assert size >= 200, f"too few ports below the ephemeral range ({LOWEST}..{top})"
    start = LOWEST + (index % count) * size
    return range(start, start + size)


_ports: Iterator[int] = itertools.cycle(_slice())
_lock = threading.Lock()


def _binds(port: int, udp: bool) -> bool:
    kinds = [socket.SOCK_STREAM, socket.SOCK_DGRAM] if udp else [socket.SOCK_STREAM]
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port(udp: bool = False) -> int:
    """The next port of this worker's slice free on 127.0.0.1 for TCP (and UDP with ``udp``)."""
    with _lock:
        for _ in range(len(_slice())):
            port = next(_ports)
            if _binds(port, udp):
                return port
    raise RuntimeError("no free port on 127.0.0.1 below the ephemeral range")
