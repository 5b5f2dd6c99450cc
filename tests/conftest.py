"""Shared fixtures for the core suites: a fresh environment per test.

Trusts nothing of the extension beyond its stubs (python/kithmail/_core.pyi);
every environment lives under the test's own tmp_path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dns_server import SilentServer, StartDnsmasq, dnsmasq_servers, silent_server

import kithmail

# Small enough that many environments fit on any test disk, big enough that no
# test comes near it; LMDB maps it sparse.
MAP_SIZE = 256 << 20

# Recon timings small enough to step through by hand.
MIN_DELAY = 5
RETRY_WINDOW = 50
PASS_TTL = 200

OpenCore = Callable[..., kithmail.Core]


@pytest.fixture
def core_path(tmp_path: Path) -> Path:
    return tmp_path / "core"


@pytest.fixture
def open_core(core_path: Path) -> OpenCore:
    """Open Core instances; defaults: small map, Recon timings 5/50/200 s.

    Nothing here keeps a reference: the core refuses to reopen a path whose
    closed Core is still referenced in the process, so a test that reopens
    closes and drops its own (`core.close(); del core`). A Core nobody
    references is closed (and its buffer committed) when it is collected.
    """

    def _open(path: Path | str | None = None, **kw: Any) -> kithmail.Core:
        kw.setdefault("map_size", MAP_SIZE)
        kw.setdefault("min_delay", MIN_DELAY)
        kw.setdefault("retry_window", RETRY_WINDOW)
        kw.setdefault("pass_ttl", PASS_TTL)
        return kithmail.Core(str(path if path is not None else core_path), **kw)

    return _open


@pytest.fixture
def core(open_core: OpenCore) -> Iterator[kithmail.Core]:
    """A fresh environment with Recon timings 5/50/200 s and /32, /64 sources."""
    c = open_core()
    yield c
    c.close()


RunPython = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def run_python() -> RunPython:
    """Run code in a fresh interpreter (the one running the tests), any exit code."""

    def _run(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            check=False,
        )

    return _run


# --- real DNS servers (tests/dns_server.py) ----------------------------------


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[StartDnsmasq]:
    """Start dnsmasq processes serving the records given; all stopped at the end."""
    with dnsmasq_servers(tmp_path) as start:
        yield start


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    """A UDP socket on loopback that never answers."""
    with silent_server() as s:
        yield s
