"""No open relay: an outsider's mail goes to local users only, whatever the
address looks like; trusted networks may relay; one tenant per transaction.

The classic tricks (the `%` hack, `!` paths, quoted local parts, source
routes, address literals, a trailing dot, IDN look-alikes) are each
answered at RCPT and none puts a message anywhere but a local user's
Maildir. Postmaster (RFC 5321 §4.5.1) is accepted for every local domain,
and a bare `<postmaster>` for the gateway's own (first) local domain.

One gateway serves the module (Recon exempts 127.0.0.0/24: these tests
are not about Recon); the tenant test has its own, since it changes which
tenant a domain belongs to.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway import Gateway, Reply, message, run, running_gateway
from smtp_fixtures import (
    RECON_EXEMPT,
    Sources,
    deliver_one,
    log_lines,
    module_gateway,
    quit_,
    session,
    settle,
    wait_messages,
)

USERS = (
    "ann@example.test",
    "bob@example.test",
    "tagged@example.test",
    "cased@example.test",
    "carol@other.test",
)

src = Sources()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with module_gateway(tmp_path_factory, "relay", users=USERS, sections=RECON_EXEMPT) as g:
        yield g


def pair(r: Reply) -> tuple[int, str]:
    return (r.code, r.status)


async def _rcpt(port: int, source: str, rcpt: str, *, utf8: bool = False) -> Reply:
    c, _ = await session(port, source)
    try:
        r = await c.cmd("MAIL FROM:<bob@remote.test>" + (" SMTPUTF8" if utf8 else ""))
        assert pair(r) == (250, "2.1.0"), r
        return await c.cmd(f"RCPT TO:<{rcpt}>")
    finally:
        await quit_(c)


def _maildir_boxes(gw: Gateway) -> set[str]:
    """Every Maildir that exists, as domain/mailbox."""
    if not gw.maildir.is_dir():
        return set()
    return {f"{d.name}/{b.name}" for d in gw.maildir.iterdir() for b in d.iterdir()}


RELAY_TRICKS = [
    ("user@outside.test", 554, "5.7.1"),
    ("ann@outside.test", 554, "5.7.1"),
    ("user%outside.test@example.test", 553, "5.7.1"),
    ("outside.test!user@example.test", 553, "5.7.1"),
    ('"user@outside.test"@example.test', 553, "5.7.1"),
    ('"ann"@example.test', 553, "5.7.1"),
    ("@example.test:user@outside.test", 553, "5.7.1"),
    ("@outside.test:ann@example.test", 553, "5.7.1"),
    ("@example.test,@other.test:user@outside.test", 553, "5.7.1"),
    ("user@[127.0.0.1]", 554, "5.7.1"),
    ("ann@[192.0.2.1]", 554, "5.7.1"),
    ("user@[IPv6:::1]", 554, "5.7.1"),
    ("ann@example.test.", 501, "5.1.3"),
    ("ann@example.test.outside.test", 554, "5.7.1"),
    ("ann@xample.test", 554, "5.7.1"),
    ("ann@example.tes", 554, "5.7.1"),
    ("ann@sub.example.test", 554, "5.7.1"),
    ("ann@example.test@outside.test", 501, "5.1.3"),
    ("user@outside.test%example.test", 501, "5.1.3"),
]


@pytest.mark.parametrize(("rcpt", "code", "status"), RELAY_TRICKS)
def test_an_outsider_cannot_relay(gw: Gateway, rcpt: str, code: int, status: str) -> None:
    before = _maildir_boxes(gw)
    r = run(_rcpt(gw.port, src(), rcpt))
    assert pair(r) == (code, status), r
    assert _maildir_boxes(gw) == before


def test_relay_refusals_are_logged(gw: Gateway) -> None:
    run(_rcpt(gw.port, src(), "someone@outside.test"))
    assert log_lines(gw, "someone@outside.test", "554 5.7.1")


def test_idn_look_alike_of_a_local_domain_is_delivered_to_the_local_user(gw: Gateway) -> None:
    """UTS 46 maps a fullwidth letter to its ASCII twin, so `ｅxample.test` is
    example.test: the recipient is local (ann), and what the gateway passes
    on names the domain it judged (example.test), not the look-alike that a
    downstream server might not take as its own."""

    async def go() -> None:
        c, _ = await session(gw.port, src())
        try:
            r = await c.cmd("MAIL FROM:<bob@remote.test> SMTPUTF8")
            assert pair(r) == (250, "2.1.0"), r
            r = await c.cmd("RCPT TO:<cased@ｅxample.test>")
            assert pair(r) == (250, "2.1.5"), r
            r = await c.cmd("DATA")
            assert r.code == 354, r
            await c.send(message("look-alike") + b".\r\n")
            r = await c.reply()
            assert pair(r) == (250, "2.0.0"), r
        finally:
            await quit_(c)
        # Without SMTPUTF8 a non-ASCII address is refused outright.
        r = await _rcpt(gw.port, src(), "cased@ｅxample.test")
        assert pair(r) == (553, "5.6.7"), r

    run(go())
    (got,) = wait_messages(gw, "cased@example.test", 1)
    assert b"Delivered-To: cased@example.test\n" in got
    assert b"for <cased@example.test>" in got


def test_domain_and_local_part_case_are_folded_to_the_user(gw: Gateway) -> None:
    for rcpt, subject in (
        ("bob@EXAMPLE.TEST", "upper domain"),
        ("BOB@Example.Test", "upper local part"),
    ):
        run(deliver_one(gw.port, src(), rcpt, message(subject)))
    got = wait_messages(gw, "bob@example.test", 2)
    assert sorted(m.split(b"Subject: ")[1].split(b"\n")[0] for m in got) == [
        b"upper domain",
        b"upper local part",
    ]
    assert "example.test/bob" in _maildir_boxes(gw)
    assert not {b for b in _maildir_boxes(gw) if b.lower() != b}


def test_unknown_user_is_550_5_1_1(gw: Gateway) -> None:
    for rcpt in ("nobody@example.test", "nobody@other.test", "ann@other.test"):
        r = run(_rcpt(gw.port, src(), rcpt))
        assert pair(r) == (550, "5.1.1"), (rcpt, r)
    assert "example.test/nobody" not in _maildir_boxes(gw)


def test_plus_tag_is_delivered_to_the_user(gw: Gateway) -> None:
    run(deliver_one(gw.port, src(), "tagged+news@example.test", message("tagged")))
    (got,) = wait_messages(gw, "tagged@example.test", 1)
    assert b"Subject: tagged" in got
    assert b"Delivered-To: tagged+news@example.test\n" in got
    assert "example.test/tagged+news" not in _maildir_boxes(gw)


def test_postmaster_is_accepted_for_every_local_domain(gw: Gateway) -> None:
    """RFC 5321 §4.5.1: postmaster@ each local domain, in any case, and the
    bare <Postmaster> (§4.1.1.3), which goes to the first local domain's."""
    run(deliver_one(gw.port, src(), "postmaster@example.test", message("pm one")))
    run(deliver_one(gw.port, src(), "PostMaster@OTHER.test", message("pm two")))
    run(deliver_one(gw.port, src(), "Postmaster", message("pm bare")))
    got = wait_messages(gw, "postmaster@example.test", 2)
    assert sorted(m.split(b"Subject: ")[1].split(b"\n")[0] for m in got) == [b"pm bare", b"pm one"]
    (other,) = wait_messages(gw, "postmaster@other.test", 1)
    assert b"Subject: pm two" in other
    assert b"Delivered-To: postmaster@other.test\n" in other
    # Not a way to anywhere else: a postmaster of a foreign domain is relaying.
    r = run(_rcpt(gw.port, src(), "postmaster@outside.test"))
    assert pair(r) == (554, "5.7.1"), r
    r = run(_rcpt(gw.port, src(), "postmaster+x@example.test"))
    assert pair(r) == (550, "5.1.1"), r


def test_postmaster_is_still_judged_by_recon(tmp_path: Path) -> None:
    """Postmaster is not a way around the layers: a new source is deferred."""
    with running_gateway(tmp_path, users=("ann@example.test",)) as g:
        r = run(_rcpt(g.port, "127.0.0.9", "postmaster@example.test"))
        assert pair(r) == (451, "4.7.1"), r


def test_a_trusted_client_may_relay(gw: Gateway) -> None:
    r = run(_rcpt(gw.port, "127.0.0.1", "user@outside.test"))
    assert pair(r) == (250, "2.1.5"), r
    r = run(_rcpt(gw.port, "127.0.0.1", "user@[192.0.2.1]"))
    assert pair(r) == (250, "2.1.5"), r
    # The routing tricks stay refused even for a trusted client.
    r = run(_rcpt(gw.port, "127.0.0.1", "user%outside.test@example.test"))
    assert pair(r) == (553, "5.7.1"), r


def test_nothing_reached_a_non_local_mailbox(gw: Gateway) -> None:
    """After everything above: every Maildir is a local user's or postmaster's."""
    settle(gw, "ann@example.test", gw.port, src())
    allowed = {
        f"{a.split('@')[1]}/{a.split('@')[0]}"
        for a in (*USERS, "postmaster@example.test", "postmaster@other.test")
    }
    assert _maildir_boxes(gw) <= allowed, _maildir_boxes(gw) - allowed


# ---------------------------------------------------------------- tenants


def test_one_tenant_per_transaction(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("tenants")
    users = ("ann@example.test", "carol@other.test")
    with running_gateway(root, users=users, sections=RECON_EXEMPT) as g:
        g.kith("tenant", "add", "acme")
        g.kith("tenant", "domain", "acme", "other.test")
        source = "127.0.0.20"

        async def go() -> tuple[Reply, Reply, Reply]:
            c, _ = await session(g.port, source)
            try:
                # The server sees the change within about a second: poll.
                deadline = time.monotonic() + 20
                while True:
                    assert pair(await c.cmd("MAIL FROM:<bob@remote.test>")) == (250, "2.1.0")
                    assert pair(await c.cmd("RCPT TO:<ann@example.test>")) == (250, "2.1.5")
                    second = await c.cmd("RCPT TO:<carol@other.test>")
                    if second.code != 250 or time.monotonic() > deadline:
                        break
                    assert pair(await c.cmd("RSET")) == (250, "2.0.0")
                    await asyncio.sleep(0.1)
                assert pair(await c.cmd("DATA")) == (354, "")
                await c.send(message("for ann only") + b".\r\n")
                done = await c.reply()
                # The other way round: the first recipient's tenant decides.
                assert pair(await c.cmd("MAIL FROM:<bob@remote.test>")) == (250, "2.1.0")
                assert pair(await c.cmd("RCPT TO:<carol@other.test>")) == (250, "2.1.5")
                reverse = await c.cmd("RCPT TO:<ann@example.test>")
                assert pair(await c.cmd("RSET")) == (250, "2.0.0")
                return second, done, reverse
            finally:
                await quit_(c)

        second, done, reverse = run(go())
        assert pair(second) == (452, "4.5.3"), second
        assert pair(done) == (250, "2.0.0"), done
        assert pair(reverse) == (452, "4.5.3"), reverse
        (got,) = wait_messages(g, "ann@example.test", 1)
        assert b"Subject: for ann only" in got
        # Sent separately, as the 452 asks, carol's copy goes through.
        run(deliver_one(g.port, source, "carol@other.test", message("for carol")))
        (got,) = wait_messages(g, "carol@other.test", 1)
        assert b"Subject: for carol" in got
        assert log_lines(g, "tenant=acme", "carol@other.test", "result=accepted")
