"""Bad input at the inbound listener: each gets its RFC 5321 reply, the
session goes on where it can, and other clients are served meanwhile.

One gateway serves the module (Recon exempts 127.0.0.0/24: these tests
are not about Recon); the command timeout has its own, since a short
timeout would cut the other tests' sessions. Every test talks from fresh
source addresses so per-IP counters never cross tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from gateway import Client, Gateway, Reply, message, run, running_gateway
from smtp_fixtures import (
    RECON_EXEMPT,
    Sources,
    deliver_one,
    log_lines,
    merge,
    module_gateway,
    quit_,
    session,
    settle,
    wait_log,
    wait_messages,
)

MAX_SIZE = 32 * 1024
USERS = tuple(
    f"{u}@example.test"
    for u in (
        "ann",
        "longline",
        "exact",
        "bigmsg",
        "r1",
        "r2",
        "r3",
        "r4",
        "hangup",
        "slow",
        "quick",
        "tail",
    )
)

src = Sources()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    sections = merge(
        RECON_EXEMPT,
        {
            "limits": {
                "max_message_size": MAX_SIZE,
                "max_recipients": 3,
                "max_bad_commands": 6,
                # Small, so that a leak of a few hung-up messages' bytes shows.
                "data_memory": 4 * MAX_SIZE,
            }
        },
    )
    with module_gateway(tmp_path_factory, "bad-input", users=USERS, sections=sections) as g:
        yield g


async def replies(c: Client, n: int) -> list[Reply]:
    return [await c.reply() for _ in range(n)]


def pair(r: Reply) -> tuple[int, str]:
    return (r.code, r.status)


# ---------------------------------------------------------------- commands


def test_unknown_command_is_500_5_5_2_and_the_session_goes_on(gw: Gateway) -> None:
    async def go() -> None:
        c, _ = await session(gw.port, src())
        assert pair(await c.cmd("FOO bar")) == (500, "5.5.2")
        assert pair(await c.cmd("MAILFROM:<bob@remote.test>")) == (500, "5.5.2")
        # Verbs are case-insensitive (RFC 5321 §2.4); the session still works.
        assert pair(await c.cmd("noop")) == (250, "2.0.0")
        assert pair(await c.cmd("mail from:<bob@remote.test>")) == (250, "2.1.0")
        await quit_(c)

    run(go())


MAIL_SYNTAX = [
    ("MAIL FROM:bob@remote.test", 501, "5.5.4"),
    ("MAIL FROM <bob@remote.test>", 501, "5.5.4"),
    ("MAIL TO:<bob@remote.test>", 501, "5.5.4"),
    ("MAIL", 501, "5.5.4"),
    ("MAIL FROM:<bob@remote.test", 501, "5.1.3"),
    ("MAIL FROM:<bob@@remote.test>", 501, "5.1.3"),
    ("MAIL FROM:<bob>", 501, "5.1.3"),
    ("MAIL FROM:<bob@remote..test>", 501, "5.1.3"),
    ("MAIL FROM:<bob@remote.test>SIZE=10", 501, "5.1.3"),
    ("MAIL FROM:<" + "b" * 65 + "@remote.test>", 553, "5.1.3"),
    ("MAIL FROM:<bøb@remote.test>", 553, "5.6.7"),
    ("MAIL FROM:<bob@remote.test> FOO=bar", 555, "5.5.4"),
    ("MAIL FROM:<bob@remote.test> SIZE=ten", 501, "5.5.4"),
    ("MAIL FROM:<bob@remote.test> SIZE=1 SIZE=2", 555, "5.5.4"),
    ("MAIL FROM:<bob@remote.test> BODY=BINARYMIME", 501, "5.5.4"),
    ("MAIL FROM:<bob@remote.test> SMTPUTF8=yes", 501, "5.5.4"),
    (f"MAIL FROM:<bob@remote.test> SIZE={MAX_SIZE + 1}", 552, "5.3.4"),
]


@pytest.mark.parametrize(("line", "code", "status"), MAIL_SYNTAX)
def test_malformed_mail_is_refused_and_starts_no_transaction(
    gw: Gateway, line: str, code: int, status: str
) -> None:
    async def go() -> None:
        c, _ = await session(gw.port, src())
        r = await c.cmd(line)
        assert pair(r) == (code, status), r
        # No transaction was opened: a RCPT now is out of order.
        assert pair(await c.cmd("RCPT TO:<ann@example.test>")) == (503, "5.5.1")
        await quit_(c)

    run(go())


RCPT_SYNTAX = [
    ("RCPT TO:ann@example.test", 501, "5.5.4"),
    ("RCPT <ann@example.test>", 501, "5.5.4"),
    ("RCPT TO:<>", 501, "5.1.3"),
    ("RCPT TO:<ann@exa mple.test>", 501, "5.1.3"),
    ("RCPT TO:<ann@-example.test>", 501, "5.1.3"),
    ("RCPT TO:<ann.@example.test>", 501, "5.1.3"),
    ("RCPT TO:<ann@example.test> NOTIFY=NEVER", 555, "5.5.4"),
    ("RCPT TO:<ann@example.test> =x", 555, "5.5.4"),
    ("RCPT TO:<ånn@example.test>", 553, "5.6.7"),
    ("RCPT TO:<" + "a" * 65 + "@example.test>", 553, "5.1.3"),
    ("RCPT TO:<ann@" + "d" * 64 + ".test>", 501, "5.1.3"),
]


@pytest.mark.parametrize(("line", "code", "status"), RCPT_SYNTAX)
def test_malformed_rcpt_is_refused_and_adds_no_recipient(
    gw: Gateway, line: str, code: int, status: str
) -> None:
    async def go() -> None:
        c, _ = await session(gw.port, src())
        assert pair(await c.cmd("MAIL FROM:<bob@remote.test>")) == (250, "2.1.0")
        r = await c.cmd(line)
        assert pair(r) == (code, status), r
        assert pair(await c.cmd("DATA")) == (503, "5.5.1")
        await quit_(c)

    run(go())


def test_commands_out_of_order_are_503_5_5_1(gw: Gateway) -> None:
    async def go() -> None:
        c, _ = await session(gw.port, src(), ehlo=None)
        assert pair(await c.cmd("MAIL FROM:<bob@remote.test>")) == (503, "5.5.1")  # no EHLO
        assert pair(await c.cmd("EHLO client.example")) == (250, "")
        assert pair(await c.cmd("RCPT TO:<ann@example.test>")) == (503, "5.5.1")
        assert pair(await c.cmd("DATA")) == (503, "5.5.1")
        assert pair(await c.cmd("MAIL FROM:<bob@remote.test>")) == (250, "2.1.0")
        assert pair(await c.cmd("DATA")) == (503, "5.5.1")  # no recipient yet
        assert pair(await c.cmd("MAIL FROM:<carol@remote.test>")) == (503, "5.5.1")  # nested
        assert pair(await c.cmd("RCPT TO:<ann@example.test>")) == (250, "2.1.5")
        assert pair(await c.cmd("RSET")) == (250, "2.0.0")
        assert pair(await c.cmd("RCPT TO:<ann@example.test>")) == (503, "5.5.1")  # RSET ended it
        assert pair(await c.cmd("DATA extra")) == (503, "5.5.1")
        await quit_(c)

    run(go())


def test_command_line_over_1000_octets_is_500_and_the_session_goes_on(gw: Gateway) -> None:
    async def go() -> None:
        c, _ = await session(gw.port, src())
        # Exactly 1000 octets with the CRLF: the limit, accepted (NOOP ignores its argument).
        at_limit = "NOOP " + "x" * (1000 - 5 - 2)
        assert pair(await c.cmd(at_limit)) == (250, "2.0.0")
        r = await c.cmd(at_limit + "x")
        assert pair(r) == (500, "5.5.2"), r
        # Far over the limit, with a command at its tail: one line, one reply,
        # and the tail is never run as a command of its own.
        await c.send(b"NOOP " + b"y" * 200_000 + b"QUIT\r\nNOOP\r\n")
        assert [pair(r) for r in await replies(c, 2)] == [(500, "5.5.2"), (250, "2.0.0")]
        assert pair(await c.cmd("MAIL FROM:<bob@remote.test>")) == (250, "2.1.0")
        await quit_(c)

    run(go())


def test_invalid_utf8_in_a_command_is_500_5_5_2(gw: Gateway) -> None:
    async def go() -> None:
        c, _ = await session(gw.port, src())
        assert pair(await c.cmd(b"MAIL FROM:<b\xffb@remote.test> SMTPUTF8")) == (500, "5.5.2")
        assert pair(await c.cmd(b"\xc3\x28")) == (500, "5.5.2")
        assert pair(await c.cmd(b"NO\xc3\xa9OP")) == (500, "5.5.2")
        # Well-formed UTF-8 with SMTPUTF8 is fine (RFC 6531).
        r = await c.cmd("MAIL FROM:<bøb@remote.test> SMTPUTF8")
        assert pair(r) == (250, "2.1.0"), r
        r = await c.cmd("RCPT TO:<ann@example.test>")
        assert pair(r) == (250, "2.1.5"), r
        await quit_(c)

    run(go())


def test_helo_and_ehlo_syntax(gw: Gateway) -> None:
    async def go() -> None:
        c, _ = await session(gw.port, src(), ehlo=None)
        assert pair(await c.cmd("EHLO")) == (501, "5.5.4")
        assert pair(await c.cmd("HELO")) == (501, "5.5.4")
        assert pair(await c.cmd("EHLO two words")) == (501, "5.5.4")
        assert pair(await c.cmd("EHLO " + "h" * 256)) == (501, "5.5.4")
        assert pair(await c.cmd("MAIL FROM:<bob@remote.test>")) == (503, "5.5.1")
        r = await c.cmd("EHLO [192.0.2.1]")
        assert r.code == 250 and r.lines[0] == "mx.kithmail.test", r
        assert "ENHANCEDSTATUSCODES" in r.lines and "PIPELINING" in r.lines
        assert f"SIZE {MAX_SIZE}" in r.lines
        # HELO: plain SMTP, so MAIL parameters are refused.
        r = await c.cmd("HELO client.example")
        assert r.lines == ["mx.kithmail.test"] and r.code == 250, r
        assert pair(await c.cmd("MAIL FROM:<bob@remote.test> SIZE=10")) == (555, "5.5.4")
        assert pair(await c.cmd("MAIL FROM:<bob@remote.test>")) == (250, "2.1.0")
        await quit_(c)

    run(go())


def test_vrfy_expn_help_noop_rset_auth_quit(gw: Gateway) -> None:
    async def go() -> None:
        c, _ = await session(gw.port, src())
        # VRFY answers the same for a user and a stranger: no address harvesting.
        for who in ("ann@example.test", "nobody@example.test", "ann"):
            r = await c.cmd(f"VRFY {who}")
            assert pair(r) == (252, "2.5.2"), r
        assert pair(await c.cmd("EXPN staff")) == (502, "5.5.1")
        assert pair(await c.cmd("HELP")) == (214, "2.0.0")
        assert pair(await c.cmd("HELP MAIL")) == (214, "2.0.0")
        assert pair(await c.cmd("NOOP")) == (250, "2.0.0")
        assert pair(await c.cmd("AUTH PLAIN AGFubgB4")) == (503, "5.5.1")
        assert pair(await c.cmd("MAIL FROM:<bob@remote.test>")) == (250, "2.1.0")
        assert pair(await c.cmd("RSET")) == (250, "2.0.0")
        assert pair(await c.cmd("MAIL FROM:<bob@remote.test>")) == (250, "2.1.0")  # not nested
        r = await c.cmd("QUIT")
        assert pair(r) == (221, "2.0.0"), r
        assert await c.closed()
        await c.close()

    run(go())


def test_too_many_bad_commands_get_421_and_the_connection_closes(gw: Gateway) -> None:
    async def go() -> None:
        c, _ = await session(gw.port, src())
        # max_bad_commands = 6: five are answered, the sixth ends the session.
        # Pipelined in one write, as a bot would.
        await c.send(b"".join(b"BAD%d\r\n" % i for i in range(10)))
        got = await replies(c, 6)
        assert [pair(r) for r in got[:5]] == [(500, "5.5.2")] * 5
        assert pair(got[5]) == (421, "4.7.0"), got[5]
        assert await c.closed()
        await c.close()

    run(go())


# ---------------------------------------------------------------- DATA


async def _open_data(c: Client, rcpt: str) -> None:
    assert pair(await c.cmd("MAIL FROM:<bob@remote.test>")) == (250, "2.1.0")
    assert pair(await c.cmd(f"RCPT TO:<{rcpt}>")) == (250, "2.1.5")
    r = await c.cmd("DATA")
    assert r.code == 354, r


def test_data_line_over_the_limit_is_500_after_the_end_of_data(gw: Gateway) -> None:
    async def go() -> None:
        c, _ = await session(gw.port, src())
        await _open_data(c, "longline@example.test")
        body = b"short line\r\n" + b"z" * 999 + b"\r\nafter\r\n"  # 1001 octets with CRLF
        await c.send(message("too long") + body + b".\r\nNOOP\r\n")
        got = await replies(c, 2)
        assert [pair(r) for r in got] == [(500, "5.5.2"), (250, "2.0.0")], got
        await quit_(c)

    run(go())
    assert settle(gw, "longline@example.test", gw.port, src()) == []
    assert log_lines(gw, "result=refused", "Line too long")


def test_data_line_of_exactly_1000_octets_is_delivered_intact(gw: Gateway) -> None:
    line = b"q" * 998  # 1000 with its CRLF; a stuffed leading dot does not count
    stuffed = b"." + b"." + b"r" * 997
    run(
        deliver_one(
            gw.port,
            src(),
            "exact@example.test",
            message("at the limit") + line + b"\r\n" + stuffed + b"\r\n",
        )
    )
    (got,) = wait_messages(gw, "exact@example.test", 1)
    assert b"\n" + line + b"\n" in got
    assert b"\n." + b"r" * 997 + b"\n" in got


def test_long_data_line_is_one_line_whatever_its_tail(gw: Gateway) -> None:
    """An over-long line is discarded through its own CRLF: its tail is never
    read as a line of its own, so a tail of "." is not the end of DATA and
    what follows is not a command (a smuggling path if it were)."""

    async def go() -> None:
        c, _ = await session(gw.port, src())
        await _open_data(c, "tail@example.test")
        # The first write stops right after the ".", so the server's reader
        # overruns its limit with the "." last in its buffer.
        await c.send(message("long tail") + b"w" * 5000 + b".")
        await asyncio.sleep(0.3)
        await c.send(
            b"\r\nMAIL FROM:<bob@remote.test>\r\nRCPT TO:<tail@example.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\nNOOP\r\n"
        )
        got = await replies(c, 2)
        assert [pair(r) for r in got] == [(500, "5.5.2"), (250, "2.0.0")], got
        await quit_(c)

    run(go())
    assert settle(gw, "tail@example.test", gw.port, src()) == []


def test_message_over_max_message_size_is_552_5_3_4(gw: Gateway) -> None:
    async def go() -> None:
        c, _ = await session(gw.port, src())
        await _open_data(c, "bigmsg@example.test")
        big = message("too big", body="x" * 900 + "\r\n") + (b"y" * 900 + b"\r\n") * 40
        assert len(big) > MAX_SIZE
        await c.send(big + b".\r\n")
        r = await c.reply()
        assert pair(r) == (552, "5.3.4"), r
        # The session goes on: a message within the limit is accepted.
        await _open_data(c, "bigmsg@example.test")
        await c.send(message("fits") + b".\r\n")
        assert pair(await c.reply()) == (250, "2.0.0")
        # SIZE= declares the size at MAIL: over the limit is refused up front.
        r = await c.cmd(f"MAIL FROM:<bob@remote.test> SIZE={MAX_SIZE + 1}")
        assert pair(r) == (552, "5.3.4"), r
        r = await c.cmd(f"MAIL FROM:<bob@remote.test> SIZE={MAX_SIZE}")
        assert pair(r) == (250, "2.1.0"), r
        await quit_(c)

    run(go())
    (got,) = wait_messages(gw, "bigmsg@example.test", 1)
    assert b"Subject: fits" in got
    assert log_lines(gw, "result=refused", "552 5.3.4")


def test_too_many_recipients_is_452_4_5_3_and_the_others_get_the_message(gw: Gateway) -> None:
    async def go() -> None:
        c, _ = await session(gw.port, src())
        assert pair(await c.cmd("MAIL FROM:<bob@remote.test>")) == (250, "2.1.0")
        for n in (1, 2, 3):
            assert pair(await c.cmd(f"RCPT TO:<r{n}@example.test>")) == (250, "2.1.5")
        r = await c.cmd("RCPT TO:<r4@example.test>")
        assert pair(r) == (452, "4.5.3"), r
        assert pair(await c.cmd("DATA")) == (354, "")
        await c.send(message("three of four") + b".\r\n")
        assert pair(await c.reply()) == (250, "2.0.0")
        await quit_(c)

    run(go())
    for n in (1, 2, 3):
        (got,) = wait_messages(gw, f"r{n}@example.test", 1)
        assert b"Subject: three of four" in got
    assert settle(gw, "r4@example.test", gw.port, src()) == []


def test_hang_up_mid_data_delivers_nothing_and_frees_its_memory(gw: Gateway) -> None:
    """data_memory is 4 messages' worth: if a hung-up client's bytes were not
    given back, six hang-ups would leave no room and a good message would get
    452 4.3.1 ever after."""

    async def hang_up(source: str) -> None:
        c, _ = await session(gw.port, source)
        await _open_data(c, "hangup@example.test")
        await c.send(message("cut short") + (b"h" * 900 + b"\r\n") * 30)  # ~27 KiB
        # Let the server read it all before the hang-up (else it may see the
        # EOF first, take nothing and prove nothing).
        await asyncio.sleep(0.2)
        await c.close()

    for _ in range(6):
        run(hang_up(src()))
    wait_log(gw, "result=disconnected", "hangup@example.test")
    # The server still serves, and has memory for a message as big as those.
    run(
        deliver_one(
            gw.port,
            src(),
            "hangup@example.test",
            message("after the hang-ups") + (b"k" * 900 + b"\r\n") * 30,
        )
    )
    (got,) = wait_messages(gw, "hangup@example.test", 1)
    assert b"Subject: after the hang-ups" in got
    assert b"cut short" not in got


def test_one_client_misbehaving_does_not_stop_another(gw: Gateway) -> None:
    """A slow client holds DATA open and a noisy one sends garbage while a
    third completes a whole transaction; then the slow one finishes too."""

    async def go() -> None:
        slow, _ = await session(gw.port, src())
        await _open_data(slow, "slow@example.test")
        await slow.send(message("slow one"))  # and then nothing, for now
        noisy, _ = await session(gw.port, src())
        await noisy.send(b"GARBAGE\r\n" * 3 + b"X" * 3000 + b"\r\n")
        queue_id = await deliver_one(gw.port, src(), "quick@example.test", message("quick one"))
        assert queue_id
        assert [pair(r) for r in await replies(noisy, 4)] == [(500, "5.5.2")] * 4
        await slow.send(b"the rest\r\n.\r\n")
        assert pair(await slow.reply()) == (250, "2.0.0")
        await quit_(slow)
        await quit_(noisy)

    run(go())
    (quick,) = wait_messages(gw, "quick@example.test", 1)
    assert b"Subject: quick one" in quick
    (slow,) = wait_messages(gw, "slow@example.test", 1)
    assert b"the rest" in slow


def test_command_timeout_is_421_4_4_2(tmp_path_factory: pytest.TempPathFactory) -> None:
    sections = merge(RECON_EXEMPT, {"limits": {"command_timeout": "1s"}})
    root = tmp_path_factory.mktemp("timeout")
    with running_gateway(root, users=("ann@example.test",), sections=sections) as g:

        async def go() -> None:
            idle, _ = await session(g.port, "127.0.0.2")
            r = await idle.reply()  # nothing sent: the server speaks first
            assert pair(r) == (421, "4.4.2"), r
            assert await idle.closed()
            await idle.close()
            mid, _ = await session(g.port, "127.0.0.3")
            assert pair(await mid.cmd("MAIL FROM:<bob@remote.test>")) == (250, "2.1.0")
            assert pair(await mid.cmd("RCPT TO:<ann@example.test>")) == (250, "2.1.5")
            r = await mid.reply()
            assert pair(r) == (421, "4.4.2"), r
            assert await mid.closed()
            await mid.close()

        run(go())
        wait_log(g, "result=timeout", "ann@example.test")
        # The server itself is fine.
        run(deliver_one(g.port, "127.0.0.4", "ann@example.test", message("after timeouts")))
        (got,) = wait_messages(g, "ann@example.test", 1)
        assert b"Subject: after timeouts" in got
