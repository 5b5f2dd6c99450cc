"""What the tests/test_smtp_*.py suites share: one gateway per module, fresh
client addresses, and the waits that replace sleeps.

Each suite starts one `kith serve` for all its tests that do not interfere
(a module-scoped fixture) and a dedicated one only where a test needs its
own config. Per-IP limits are per source address, so every test takes
fresh addresses from `Sources` and never shares a counter with another.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from gateway import Client, Gateway, Reply, message, running_gateway

# Tests that are not about Recon let 127.0.0.0/24 skip it, so an outsider's
# first attempt is judged by everything else at once.
RECON_EXEMPT: dict[str, Any] = {"recon": {"exempt_networks": ["127.0.0.0/24"]}}

QUEUE_ID = re.compile(r"queued as (\S+)")


class Sources:
    """Fresh outsider addresses, 127.0.0.<start>.. (never 127.0.0.1, the trusted one)."""

    def __init__(self, start: int = 10) -> None:
        self._next = itertools.count(start)

    def __call__(self) -> str:
        n = next(self._next)
        assert n < 255, "out of 127.0.0.x source addresses"
        return f"127.0.0.{n}"


def merge(*parts: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in parts:
        for name, values in p.items():
            out.setdefault(name, {}).update(values)
    return out


@contextlib.contextmanager
def module_gateway(
    factory: pytest.TempPathFactory,
    name: str,
    *,
    users: tuple[str, ...],
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> Iterator[Gateway]:
    with running_gateway(factory.mktemp(name), users=users, sections=sections) as gw:
        yield gw


async def session(
    port: int, source: str, *, ehlo: str | None = "client.example"
) -> tuple[Client, Reply]:
    """Connected (220 checked) and, unless ehlo is None, EHLO'd (250 checked)."""
    c, greeting = await Client.connect(port, source)
    assert greeting is not None and greeting.code == 220, greeting
    if ehlo is None:
        return c, greeting
    r = await c.cmd(f"EHLO {ehlo}")
    assert r.code == 250, r
    return c, r


async def quit_(c: Client) -> None:
    with contextlib.suppress(Exception):
        r = await c.cmd("QUIT")
        assert r.code == 221, r
    await c.close()


async def deliver_one(
    port: int, source: str, rcpt: str, data: bytes, *, sender: str = "bob@remote.test"
) -> str:
    """One whole good transaction; returns the queue id from the 250."""
    c, _ = await session(port, source)
    try:
        r = await c.cmd(f"MAIL FROM:<{sender}>")
        assert (r.code, r.status) == (250, "2.1.0"), r
        r = await c.cmd(f"RCPT TO:<{rcpt}>")
        assert (r.code, r.status) == (250, "2.1.5"), r
        r = await c.cmd("DATA")
        assert r.code == 354, r
        await c.send(data + b".\r\n")
        r = await c.reply()
        assert (r.code, r.status) == (250, "2.0.0"), r
        m = QUEUE_ID.search(r.text)
        assert m, r
        return m[1]
    finally:
        await quit_(c)


def wait_messages(gw: Gateway, address: str, n: int, timeout: float = 20.0) -> list[bytes]:
    """Poll until `address`'s Maildir holds at least n messages; exactly n is asserted."""
    got = gw.wait_for(
        f"{n} message(s) for {address}",
        lambda: (m := gw.messages(address)) and len(m) >= n and m,
        timeout,
    )
    assert len(got) == n, f"{len(got)} messages for {address}, expected {n}"
    return list(got)


def settle(gw: Gateway, address: str, port: int, source: str) -> list[bytes]:
    """Prove the queue has caught up for `address`: deliver a marker and wait for it.

    A test that expects nothing (more) delivered sends the marker last; once
    it is in the Maildir, anything the server accepted before it had its
    chance to arrive too. Returns the messages without the marker.
    """
    mark = f"marker {time.monotonic_ns()}"
    asyncio.run(deliver_one(port, source, address, message(mark)))
    got = gw.wait_for(
        f"the marker for {address}",
        lambda: (m := gw.messages(address)) and any(mark.encode() in x for x in m) and m,
    )
    return [x for x in got if mark.encode() not in x]


def log_lines(gw: Gateway, *needles: str) -> list[str]:
    return [line for line in gw.log_text().splitlines() if all(n in line for n in needles)]


def wait_log(gw: Gateway, *needles: str, timeout: float = 20.0) -> list[str]:
    return list(gw.wait_for(f"a log line with {needles}", lambda: log_lines(gw, *needles), timeout))


def sessions_open(gw: Gateway) -> float:
    """The server's `kithmail_smtp_sessions` gauge (sessions counted against the limits)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.web_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("kithmail_smtp_sessions "):
            return float(line.split()[1])
    raise AssertionError("no kithmail_smtp_sessions in /metrics")


def wait_no_sessions(gw: Gateway, timeout: float = 5.0) -> None:
    """Every session has ended and left the connection counts (polled)."""
    gw.wait_for("no SMTP session left open", lambda: sessions_open(gw) == 0, timeout)
