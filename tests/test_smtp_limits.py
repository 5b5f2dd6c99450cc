"""Connection limits and the pre-greeting test, against the real listener.

Per address (`max_connections_per_ip`, `connections_per_ip_per_minute`:
421 4.7.0), overall (`max_connections`: 421 4.3.2), each answered at
connect and the connection closed, while others are still served; and
postscreen's pregreet test (`pregreet_wait`): a source Recon has not
passed gets "220-" and must wait for the rest of the greeting; one that
talks first gets 554 5.5.1 and is closed.

Each limit is tested on its own gateway config: the per-IP limits share
one (each test with its own addresses), `max_connections` and the
pregreet test have their own (a global limit would cut the others' tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway import Client, Gateway, Reply, run, running_gateway
from smtp_fixtures import (
    RECON_EXEMPT,
    Sources,
    log_lines,
    merge,
    module_gateway,
    quit_,
    session,
    wait_log,
    wait_no_sessions,
)

PER_IP = 2
PER_MINUTE = 5

src = Sources()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    sections = merge(
        RECON_EXEMPT,
        {
            "limits": {
                "max_connections_per_ip": PER_IP,
                "connections_per_ip_per_minute": PER_MINUTE,
            }
        },
    )
    with module_gateway(
        tmp_path_factory, "limits", users=("ann@example.test",), sections=sections
    ) as g:
        yield g


def pair(r: Reply | None) -> tuple[int, str]:
    assert r is not None
    return (r.code, r.status)


async def _close_all(clients: list[Client]) -> None:
    for c in clients:
        await quit_(c)


def test_third_concurrent_connection_from_one_address_gets_421_4_7_0(gw: Gateway) -> None:
    a, other = src(), src()

    async def go() -> None:
        held: list[Client] = []
        try:
            for _ in range(PER_IP):
                c, hello = await Client.connect(gw.port, a)
                held.append(c)
                assert pair(hello) == (220, ""), hello
            c, hello = await Client.connect(gw.port, a)
            assert pair(hello) == (421, "4.7.0"), hello
            assert "Too many connections from your address" in hello.text  # type: ignore[union-attr]
            assert await c.closed()
            await c.close()
            # Another address is served meanwhile, and the held sessions still work.
            c, hello = await Client.connect(gw.port, other)
            assert pair(hello) == (220, ""), hello
            held.append(c)
            assert pair(await held[0].cmd("NOOP")) == (250, "2.0.0")
            # Once one of the address's sessions ends, it may connect again.
            await quit_(held.pop(0))
            deadline = time.monotonic() + 10
            while True:
                c, hello = await Client.connect(gw.port, a)
                if pair(hello) == (220, "") or time.monotonic() > deadline:
                    break
                await c.close()
                await asyncio.sleep(0.05)
            held.append(c)
            assert pair(hello) == (220, ""), hello
        finally:
            await _close_all(held)

    run(go())
    assert log_lines(gw, "refused", f"client={a}", "why=limit_ip")


def test_connections_per_ip_per_minute_get_421_4_7_0(gw: Gateway) -> None:
    """The window is a fixed minute: twelve connections in a row cross at
    most one boundary, so one of them must meet the limit, and never before
    PER_MINUTE were let in within its minute."""
    a = src()

    async def go() -> list[Reply]:
        got = []
        for _ in range(12):
            c, hello = await Client.connect(gw.port, a)
            assert hello is not None
            got.append(hello)
            if hello.code == 220:
                await quit_(c)
            else:
                assert await c.closed()
                await c.close()
        return got

    got = run(go())
    codes = [pair(r) for r in got]
    assert (421, "4.7.0") in codes, codes
    first = codes.index((421, "4.7.0"))
    assert first >= PER_MINUTE, codes
    assert set(codes) <= {(220, ""), (421, "4.7.0")}, codes
    assert "per minute" in got[first].text
    assert log_lines(gw, "refused", f"client={a}", "why=rate")


def test_trusted_network_is_not_held_to_the_per_ip_limits(gw: Gateway) -> None:
    async def go() -> None:
        held: list[Client] = []
        try:
            for _ in range(PER_MINUTE + 2):
                c, hello = await Client.connect(gw.port, "127.0.0.1")
                held.append(c)
                assert pair(hello) == (220, ""), hello
        finally:
            await _close_all(held)

    run(go())


def test_max_connections_gets_421_4_3_2(tmp_path: Path) -> None:
    sections = merge(RECON_EXEMPT, {"limits": {"max_connections": 2}})
    with running_gateway(tmp_path, users=("ann@example.test",), sections=sections) as g:

        async def go() -> None:
            held: list[Client] = []
            try:
                # The readiness probe's session may still be ending: poll
                # until two are held and the third is refused.
                deadline = time.monotonic() + 10
                while True:
                    for c in held:
                        await quit_(c)
                    held.clear()
                    replies = []
                    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
                        c, hello = await Client.connect(g.port, source)
                        held.append(c)
                        replies.append(pair(hello))
                    if replies[:2] == [(220, "")] * 2 or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
                assert replies == [(220, ""), (220, ""), (421, "4.3.2")], replies
                assert await held[2].closed()
                # Trusted or not, the overall limit is for everyone.
                c, hello = await Client.connect(g.port, "127.0.0.1")
                held.append(c)
                assert pair(hello) == (421, "4.3.2"), hello
                # The held sessions still work; a freed slot is taken again.
                assert pair(await held[0].cmd("NOOP")) == (250, "2.0.0")
                await quit_(held.pop(0))
                deadline = time.monotonic() + 10
                while True:
                    c, hello = await Client.connect(g.port, "127.0.0.5")
                    if pair(hello) == (220, "") or time.monotonic() > deadline:
                        break
                    await c.close()
                    await asyncio.sleep(0.05)
                held.append(c)
                assert pair(hello) == (220, ""), hello
            finally:
                for c in held:
                    with contextlib.suppress(Exception):
                        await c.close()

        run(go())
        assert log_lines(g, "refused", "why=limit")


# ---------------------------------------------------------------- pregreet


@pytest.fixture(scope="module")
def pregreet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # No Recon exemption: the test is for sources Recon has not passed.
    sections = {"limits": {"pregreet_wait": "500ms"}}
    with module_gateway(
        tmp_path_factory, "pregreet", users=("ann@example.test",), sections=sections
    ) as g:
        yield g


def test_talking_before_the_greeting_gets_554_5_5_1(pregreet: Gateway) -> None:
    async def go() -> Reply:
        c, _ = await Client.connect(pregreet.port, "127.0.0.30", greet=False)
        try:
            await c.send(b"EHLO hasty.example\r\n")
            r = await c.reply()
            assert await c.closed()
            return r
        finally:
            await c.close()

    r = run(go())
    assert pair(r) == (554, "5.5.1"), r
    assert r.lines[0] == "mx.kithmail.test ESMTP kithmail"  # the "220-" it did not wait for
    wait_log(pregreet, "refused", "client=127.0.0.30", "why=pregreet")


def test_waiting_for_the_greeting_gets_220_after_a_220_dash_line(pregreet: Gateway) -> None:
    async def go() -> None:
        c, hello = await Client.connect(pregreet.port, "127.0.0.31")
        assert hello is not None
        assert (hello.code, len(hello.lines)) == (220, 2), hello
        assert hello.lines == ["mx.kithmail.test ESMTP kithmail"] * 2
        r = await c.cmd("EHLO patient.example")
        assert r.code == 250, r
        r = await c.cmd("MAIL FROM:<bob@remote.test>")
        assert pair(r) == (250, "2.1.0"), r
        await quit_(c)

    run(go())


def test_a_trusted_client_gets_its_greeting_at_once(pregreet: Gateway) -> None:
    async def go() -> None:
        c, _ = await Client.connect(pregreet.port, "127.0.0.1", greet=False)
        # The whole greeting, one "220 " line, with no wait to sit out:
        # talking first right away is no offence for a trusted client.
        await c.send(b"NOOP\r\n")
        hello = await c.reply()
        assert (hello.code, hello.lines) == (220, ["mx.kithmail.test ESMTP kithmail"]), hello
        assert pair(await c.reply()) == (250, "2.0.0")
        await quit_(c)

    run(go())
    assert not log_lines(pregreet, "refused", "client=127.0.0.1 ")


def test_a_source_recon_exempts_is_not_held_for_the_pregreet_test(pregreet: Gateway) -> None:
    pregreet.kith("recon", "exempt", "127.0.0.32/32")

    async def go() -> Reply:
        # The server reads the exemption from the core; poll until it shows.
        deadline = time.monotonic() + 10
        while True:
            c, hello = await session(pregreet.port, "127.0.0.32", ehlo=None)
            await quit_(c)
            if len(hello.lines) == 1 or time.monotonic() > deadline:
                return hello
            await asyncio.sleep(0.1)

    hello = run(go())
    assert hello.lines == ["mx.kithmail.test ESMTP kithmail"], hello


def test_a_client_that_hangs_up_in_the_pregreet_wait_leaves_no_session(
    pregreet: Gateway,
) -> None:
    """Bots often drop on the "220-": their sessions must end at once, not
    count against the limits until the command timeout (300 s)."""

    async def go() -> None:
        c, _ = await Client.connect(pregreet.port, "127.0.0.33", greet=False)
        line = await c.reader.readline()
        assert line.startswith(b"220-"), line
        await c.close()

    wait_no_sessions(pregreet)
    run(go())
    wait_no_sessions(pregreet)
