"""Trusted upstreams: XCLIENT and the PROXY protocol, from them and only them.

A load balancer or a Postfix in front (`[server] trusted_upstreams`)
passes the real client's address, and the layers judge that address: a
never-seen one is deferred by Recon (451 4.7.1) and the log and the
Received header name it. From anyone else XCLIENT is refused (550 5.7.0)
and not advertised, and a PROXY line is just an unknown command.

Recon is on in both gateways (no exemptions): its verdict on the passed
address is what shows that the address was taken.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import Iterator

import pytest
from gateway import Client, Gateway, Reply, message, run
from smtp_fixtures import (
    log_lines,
    module_gateway,
    quit_,
    session,
    wait_messages,
    wait_no_sessions,
)

USERS = ("ann@example.test", "bob@example.test")


@pytest.fixture(scope="module")
def xclient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    sections = {"server": {"trusted_upstreams": ["127.0.0.1/32"]}}
    with module_gateway(tmp_path_factory, "xclient", users=USERS, sections=sections) as g:
        yield g


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # The upstream is 127.0.0.3, so the readiness probe (from 127.0.0.1)
    # still gets its greeting without a PROXY header.
    sections = {"server": {"trusted_upstreams": ["127.0.0.3/32"], "proxy_protocol": True}}
    with module_gateway(tmp_path_factory, "proxy", users=USERS, sections=sections) as g:
        yield g


def pair(r: Reply | None) -> tuple[int, str]:
    assert r is not None
    return (r.code, r.status)


async def _mail_rcpt(c: Client, rcpt: str = "ann@example.test") -> Reply:
    assert pair(await c.cmd("MAIL FROM:<bob@remote.test>")) == (250, "2.1.0")
    return await c.cmd(f"RCPT TO:<{rcpt}>")


# ---------------------------------------------------------------- XCLIENT


def test_xclient_from_a_non_upstream_is_refused_and_not_advertised(xclient: Gateway) -> None:
    async def go() -> tuple[Reply, Reply, Reply]:
        c, ehlo = await session(xclient.port, "127.0.0.5")
        try:
            assert not [x for x in ehlo.lines if x.startswith("XCLIENT")], ehlo
            refused = await c.cmd("XCLIENT ADDR=127.0.0.1")
            again = await c.cmd("EHLO client.example")
            # Still judged as itself: a new source to Recon, not the trusted 127.0.0.1.
            return refused, again, await _mail_rcpt(c)
        finally:
            await quit_(c)

    refused, again, rcpt = run(go())
    assert pair(refused) == (550, "5.7.0"), refused
    assert again.code == 250
    assert pair(rcpt) == (451, "4.7.1"), rcpt
    assert log_lines(xclient, "client=127.0.0.5 ", "451 4.7.1")


def test_xclient_from_an_upstream_sets_the_client_recon_judges(xclient: Gateway) -> None:
    async def go(source: str) -> tuple[Reply, Reply, Reply, Reply]:
        c, ehlo = await session(xclient.port, source)
        try:
            assert "XCLIENT ADDR NAME HELO PROTO" in ehlo.lines, ehlo
            hello = await c.cmd("XCLIENT ADDR=198.51.100.7 NAME=mail.sender.test")
            ehlo2 = await c.cmd("EHLO sender.example")
            second = await c.cmd("XCLIENT ADDR=127.0.0.1")
            return hello, ehlo2, second, await _mail_rcpt(c)
        finally:
            await quit_(c)

    hello, ehlo2, second, rcpt = run(go("127.0.0.1"))
    # Postfix's XCLIENT_README: the session starts over with a new greeting.
    assert (hello.code, hello.lines) == (220, ["mx.kithmail.test ESMTP kithmail"]), hello
    # Now the session stands for 198.51.100.7: no XCLIENT for it, and no second one.
    assert not [x for x in ehlo2.lines if x.startswith("XCLIENT")], ehlo2
    assert pair(second) == (550, "5.7.0"), second
    # 127.0.0.1 is trusted and would have been accepted; 198.51.100.7 is new to Recon.
    assert pair(rcpt) == (451, "4.7.1"), rcpt
    assert log_lines(xclient, "client=198.51.100.7", "ann@example.test")
    shown = xclient.kith("recon", "show", "198.51.100.7")
    assert "198.51.100.7" in shown.stdout, shown.stdout


def test_xclient_retry_after_min_delay_is_delivered_under_the_passed_name(
    xclient: Gateway,
) -> None:
    async def go() -> tuple[Reply, Reply]:
        c, _ = await session(xclient.port, "127.0.0.1")
        try:
            r = await c.cmd("XCLIENT ADDR=198.51.100.9 NAME=relay.sender.test HELO=odd(helo)")
            assert r.code == 220, r
            first = await _mail_rcpt(c)
        finally:
            await quit_(c)
        await asyncio.sleep(2.1)  # Recon's min_delay is 2 s: the retry must come after it
        c, _ = await session(xclient.port, "127.0.0.1")
        try:
            r = await c.cmd("XCLIENT ADDR=198.51.100.9 NAME=relay.sender.test")
            assert r.code == 220, r
            assert (await c.cmd("EHLO relay.sender.test")).code == 250
            retry = await _mail_rcpt(c, "bob@example.test")
            assert retry.code == 250, retry
            assert (await c.cmd("DATA")).code == 354
            await c.send(message("via upstream") + b".\r\n")
            return first, await c.reply()
        finally:
            await quit_(c)

    first, done = run(go())
    assert pair(first) == (451, "4.7.1"), first
    assert pair(done) == (250, "2.0.0"), done
    (got,) = wait_messages(xclient, "bob@example.test", 1)
    assert b"Received: from relay.sender.test (relay.sender.test [198.51.100.9])" in got, got


@pytest.mark.parametrize(
    ("line", "code", "status"),
    [
        ("XCLIENT ADDR=not-an-address", 501, "5.5.4"),
        ("XCLIENT COLOUR=blue", 501, "5.5.4"),
        ("XCLIENT ADDR", 501, "5.5.4"),
    ],
)
def test_bad_xclient_from_an_upstream_is_501(
    xclient: Gateway, line: str, code: int, status: str
) -> None:
    async def go() -> tuple[Reply, Reply]:
        c, _ = await session(xclient.port, "127.0.0.1")
        try:
            r = await c.cmd(line)
            # Nothing changed: still the trusted 127.0.0.1, accepted at once.
            return r, await _mail_rcpt(c)
        finally:
            await quit_(c)

    r, rcpt = run(go())
    assert pair(r) == (code, status), r
    assert pair(rcpt) == (250, "2.1.5"), rcpt


def test_xclient_in_a_transaction_is_503(xclient: Gateway) -> None:
    async def go() -> Reply:
        c, _ = await session(xclient.port, "127.0.0.1")
        try:
            assert pair(await c.cmd("MAIL FROM:<bob@remote.test>")) == (250, "2.1.0")
            return await c.cmd("XCLIENT ADDR=198.51.100.10")
        finally:
            await quit_(c)

    r = run(go())
    assert pair(r) == (503, "5.5.1"), r


# ---------------------------------------------------------------- PROXY


def _proxy_v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A PROXY protocol v2 header, PROXY command, TCP over IPv4."""
    body = (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize(
    ("client", "header"),
    [
        ("198.51.100.8", b"PROXY TCP4 198.51.100.8 192.0.2.1 40000 25\r\n"),
        ("198.51.100.11", _proxy_v2("198.51.100.11", "192.0.2.1", 40001, 25)),
    ],
    ids=["v1", "v2"],
)
def test_proxy_header_from_an_upstream_sets_the_client(
    proxy: Gateway, client: str, header: bytes
) -> None:
    async def go() -> tuple[Reply, Reply]:
        c, _ = await Client.connect(proxy.port, "127.0.0.3", greet=False)
        try:
            await c.send(header)
            hello = await c.reply()
            assert (await c.cmd("EHLO lb.example")).code == 250
            return hello, await _mail_rcpt(c)
        finally:
            await quit_(c)

    hello, rcpt = run(go())
    assert pair(hello) == (220, ""), hello
    # 127.0.0.3 would be judged too, but as itself: the log says whom Recon saw.
    assert pair(rcpt) == (451, "4.7.1"), rcpt
    assert log_lines(proxy, f"client={client}", "ann@example.test")
    shown = proxy.kith("recon", "show", client)
    assert client in shown.stdout, shown.stdout


def test_bad_proxy_header_from_an_upstream_is_421(proxy: Gateway) -> None:
    async def go() -> tuple[Reply, bool]:
        c, _ = await Client.connect(proxy.port, "127.0.0.3", greet=False)
        try:
            await c.send(b"EHLO i.forgot.the.header\r\n")
            return await c.reply(), await c.closed()
        finally:
            await c.close()

    r, closed = run(go())
    assert pair(r) == (421, "4.7.0"), r
    assert closed


def test_proxy_line_from_a_non_upstream_is_just_a_bad_command(proxy: Gateway) -> None:
    async def go() -> tuple[Reply, Reply, Reply]:
        # Greeted at once: no PROXY header is expected from a non-upstream.
        c, _ = await session(proxy.port, "127.0.0.4", ehlo=None)
        try:
            bad = await c.cmd("PROXY TCP4 127.0.0.1 192.0.2.1 40000 25")
            ehlo = await c.cmd("EHLO client.example")
            return bad, ehlo, await _mail_rcpt(c)
        finally:
            await quit_(c)

    bad, ehlo, rcpt = run(go())
    assert pair(bad) == (500, "5.5.2"), bad
    assert ehlo.code == 250
    assert pair(rcpt) == (451, "4.7.1"), rcpt  # judged as 127.0.0.4, never as 127.0.0.1
    assert log_lines(proxy, "client=127.0.0.4 ", "ann@example.test")


def test_a_silent_upstream_does_not_stop_others(proxy: Gateway) -> None:
    """An upstream that has not sent its header yet holds only its own session."""

    async def go() -> None:
        silent, _ = await Client.connect(proxy.port, "127.0.0.3", greet=False)
        try:
            c, _ = await session(proxy.port, "127.0.0.6")
            assert pair(await c.cmd("NOOP")) == (250, "2.0.0")
            await quit_(c)
        finally:
            await silent.close()

    run(go())


def test_an_upstream_that_hangs_up_before_its_header_leaves_no_session(proxy: Gateway) -> None:
    """Its session must end at once, not hold a place in the connection
    limits until the 10 s deadline of the PROXY read."""

    async def go() -> None:
        c, _ = await Client.connect(proxy.port, "127.0.0.3", greet=False)
        await c.send(b"PROXY TCP4 198.51.100")  # and no more
        await c.close()

    wait_no_sessions(proxy)
    run(go())
    wait_no_sessions(proxy)
