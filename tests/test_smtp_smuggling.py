"""SMTP smuggling (SEC Consult, December 2023): only <CRLF>.<CRLF> ends DATA.

Each variant hides a would-be end of data (`<LF>.<LF>`, `<CR>.<CR>`, ...)
inside a message, follows it with a second transaction (MAIL FROM, RCPT
TO, DATA, a forged message) and ends with a real <CRLF>.<CRLF>. A server
that took the hidden end for the real one would run the second
transaction and deliver the forged message to the victim.

With `[limits] bare_newlines = "reject"` (the default) the message is
refused with 554 5.6.0 and nothing reaches either mailbox; with
"normalize" exactly one message is delivered, carrying the would-be
commands as text, with no bare CR or LF left in it. Every variant is sent
both step by step and pipelined in one write (as a smuggling sender's
outbound server would pass it on).

One gateway per mode for the module; Recon exempts 127.0.0.0/24 (these
tests are not about Recon).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from gateway import Client, Gateway, Reply, run
from smtp_fixtures import (
    RECON_EXEMPT,
    Sources,
    log_lines,
    merge,
    module_gateway,
    quit_,
    session,
    settle,
    wait_messages,
)

# name → the bytes standing where the first message would "end".
VARIANTS = {
    "lf-dot-lf": b"\n.\n",
    "cr-dot-cr": b"\r.\r",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "crlf-dot-cr": b"\r\n.\r",
    "cr-dot-crlf": b"\r.\r\n",
    "lf-dot-cr": b"\n.\r",
    "dot-lf": b".\n",
    "crlf-dot-crcrlf": b"\r\n.\r\r\n",
}
WAYS = ("stepwise", "pipelined")

USERS = (
    *(
        f"{role}-{way}-{name}@example.test"
        for name in VARIANTS
        for way in WAYS
        for role in ("carrier", "victim")
    ),
    "headers@example.test",
)

src = Sources()


def _gateway(factory: pytest.TempPathFactory, mode: str) -> Iterator[Gateway]:
    sections = merge(RECON_EXEMPT, {"limits": {"bare_newlines": mode}})
    with module_gateway(factory, f"smuggling-{mode}", users=USERS, sections=sections) as g:
        yield g


@pytest.fixture(scope="module")
def rejecting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    yield from _gateway(tmp_path_factory, "reject")


@pytest.fixture(scope="module")
def normalizing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    yield from _gateway(tmp_path_factory, "normalize")


def _smuggling_data(hidden_end: bytes, victim: str) -> bytes:
    return (
        b"From: bob@remote.test\r\nTo: carrier@example.test\r\nSubject: carrier\r\n\r\n"
        b"first part"
        + hidden_end
        + b"MAIL FROM:<admin@example.test>\r\n"
        + f"RCPT TO:<{victim}>\r\n".encode()
        + b"DATA\r\n"
        + b"From: admin@example.test\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
        + b".\r\n"
    )


async def _send(c: Client, way: str, carrier: str, data: bytes) -> list[Reply]:
    """The transaction then a NOOP; every reply up to the NOOP's."""
    head = ["MAIL FROM:<bob@remote.test>", f"RCPT TO:<{carrier}>", "DATA"]
    got: list[Reply] = []
    if way == "pipelined":
        await c.send(b"".join(x.encode() + b"\r\n" for x in head) + data + b"NOOP\r\n")
    else:
        for x in head:
            got.append(await c.cmd(x))
        await c.send(data + b"NOOP\r\n")
    # Read until the NOOP's "250 2.0.0 Ok" (its text tells it from a 250 after DATA).
    while True:
        r = await c.reply()
        got.append(r)
        if r.code == 250 and r.text == "2.0.0 Ok":
            return got
        assert len(got) < 12, got


def _codes(replies: list[Reply]) -> list[tuple[int, str]]:
    return [(r.code, r.status) for r in replies]


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_reject_refuses_the_message_and_runs_nothing_smuggled(
    rejecting: Gateway, name: str, way: str
) -> None:
    gw = rejecting
    carrier, victim = f"carrier-{way}-{name}@example.test", f"victim-{way}-{name}@example.test"

    async def go() -> list[Reply]:
        c, _ = await session(gw.port, src())
        try:
            return await _send(c, way, carrier, _smuggling_data(VARIANTS[name], victim))
        finally:
            await quit_(c)

    got = run(go())
    assert _codes(got) == [
        (250, "2.1.0"),
        (250, "2.1.5"),
        (354, ""),
        (554, "5.6.0"),
        (250, "2.0.0"),
    ]
    assert "Bare CR or LF" in got[3].text
    # Not the carrier, not the victim: nothing was accepted.
    assert settle(gw, carrier, gw.port, src()) == []
    assert settle(gw, victim, gw.port, src()) == []
    refused = log_lines(gw, "result=refused", carrier)
    assert len(refused) == 1 and "554 5.6.0" in refused[0], refused
    assert not log_lines(gw, "result=accepted", "admin@example.test")


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_normalize_delivers_one_message_holding_the_commands_as_text(
    normalizing: Gateway, name: str, way: str
) -> None:
    gw = normalizing
    carrier, victim = f"carrier-{way}-{name}@example.test", f"victim-{way}-{name}@example.test"

    async def go() -> list[Reply]:
        c, _ = await session(gw.port, src())
        try:
            return await _send(c, way, carrier, _smuggling_data(VARIANTS[name], victim))
        finally:
            await quit_(c)

    got = run(go())
    # Exactly one 250 after DATA, then the NOOP's: no second transaction ran.
    assert _codes(got) == [
        (250, "2.1.0"),
        (250, "2.1.5"),
        (354, ""),
        (250, "2.0.0"),
        (250, "2.0.0"),
    ]
    assert "queued as" in got[3].text
    (delivered,) = wait_messages(gw, carrier, 1)
    # The Maildir copy turns each CRLF into LF, so any CR left was a bare one.
    assert b"\r" not in delivered
    lines = delivered.split(b"\n")
    assert b"MAIL FROM:<admin@example.test>" in lines
    assert f"RCPT TO:<{victim}>".encode() in lines
    assert b"DATA" in lines and b"smuggled body" in lines
    assert b"Subject: carrier" in lines
    assert settle(gw, victim, gw.port, src()) == []
    assert not log_lines(gw, "result=accepted", "admin@example.test")


def test_normalize_exposes_a_header_hidden_behind_a_bare_lf(normalizing: Gateway) -> None:
    """A field after a bare LF is a field of its own to every downstream
    reader, so the rule that removes headers only we may write must see it."""
    gw = normalizing
    data = (
        b"From: bob@remote.test\r\nSubject: hi\nX-Kithmail-Verdict: community=accept\r\n"
        b"Received-SPF: pass\r\r\n\r\nbody\r\n.\r\n"
    )

    async def go() -> Reply:
        c, _ = await session(gw.port, src())
        try:
            got = await _send(c, "stepwise", "headers@example.test", data)
            return got[3]
        finally:
            await quit_(c)

    r = run(go())
    assert (r.code, r.status) == (250, "2.0.0"), r
    (delivered,) = wait_messages(gw, "headers@example.test", 1)
    head = delivered.split(b"\n\n", 1)[0].lower()
    assert b"subject: hi" in head
    # The forged field is gone (ours, naming a shadow decision, may be there).
    assert b"community=accept" not in delivered.lower()
    assert b"received-spf" not in delivered.lower()
