"""The community end to end: held, challenged, confirmed by a reply, released.

`kith serve` with layer 5 enforcing, a dnsmasq serving SPF and DMARC for
the outside sender's domain (so its identity is authenticated), and a real
Postfix `smtp-sink` as the outbound smarthost, so the test reads the real
challenge that left the gateway. Then, as a person would: the sender
replies to the challenge's address, and every message they had held for
that user is delivered, the first and a second one held meanwhile; the
next message from them is delivered at once.
"""

from __future__ import annotations

import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
from auth_zones import ZONES, message, records
from dns_server import Dnsmasq, StartDnsmasq
from gateway import Gateway, Reply, run, running_gateway, send, smtp_quit
from sink import Sink, smtp_sink

OUTSIDE = "127.0.0.70"
SPF = [("bank.test", "v=spf1 ip4:127.0.0.0/24 -all")]
TOKEN_ADDRESS = re.compile(rb"sav\+[a-z2-7]+@example\.test")


@pytest.fixture
def zones(dnsmasq: StartDnsmasq) -> Dnsmasq:
    return dnsmasq(zones=ZONES, txt=[*records(), *SPF])


@pytest.fixture
def outbound() -> Iterator[Sink]:
    with smtp_sink() as s:
        yield s


@pytest.fixture
def gw(tmp_path: Path, zones: Dnsmasq, outbound: Sink) -> Iterator[Gateway]:
    with running_gateway(
        tmp_path / "gw",
        sections={
            "dns": {"nameservers": [zones.address], "timeout": "1s"},
            "domains": {"outbound": outbound.url},
            "recon": {"exempt_networks": ["127.0.0.0/24"]},
            "community": {"mode": "enforce"},
        },
    ) as g:
        yield g


def _send(gw: Gateway, sender: str, rcpt: str, data: bytes) -> list[Reply]:
    return run(send(gw.port, OUTSIDE, sender, [rcpt], data))


def _challenges(sink: Sink) -> list[bytes]:
    return [m for m in sink.messages() if b"Auto-Submitted: auto-replied" in m]


def test_unknown_sender_held_challenged_reply_releases_everything(
    gw: Gateway, outbound: Sink
) -> None:
    first = message(from_="Ann <ann@bank.test>", subject="first", message_id="<1@bank.test>")
    assert _send(gw, "ann@bank.test", "bob@example.test", first)[-1].code == 250
    # Held, not delivered; one challenge to the envelope sender.
    assert gw.messages("bob@example.test") == []
    (challenge,) = gw.wait_for("the challenge at the smarthost", lambda: _challenges(outbound))
    # To the envelope sender, from the null sender (RFC 3834 §3.3).
    assert b"X-Rcpt-Args: <ann@bank.test>" in challenge
    assert b"X-Mail-Args: <>" in challenge
    assert b"first" in challenge  # names the held message's subject
    token_address = TOKEN_ADDRESS.search(challenge)
    assert token_address is not None, challenge[:2000]
    held = gw.kith("quarantine", "list", "bob@example.test").stdout
    assert "first" in held

    # A second message held meanwhile: no second challenge (once per interval).
    second = message(from_="Ann <ann@bank.test>", subject="second", message_id="<2@bank.test>")
    assert _send(gw, "ann@bank.test", "bob@example.test", second)[-1].code == 250
    assert "second" in gw.kith("quarantine", "list", "bob@example.test").stdout
    assert len(_challenges(outbound)) == 1

    # The sender replies to the challenge's address: both are released.
    reply = message(from_="Ann <ann@bank.test>", subject="Re: confirm", message_id="<3@bank.test>")
    got = _send(gw, "ann@bank.test", token_address[0].decode(), reply)
    assert got[2].code == 250 and got[-1].code == 250, got
    delivered = gw.wait_for(
        "both held messages delivered", lambda: len(gw.messages("bob@example.test")) == 2
    )
    assert delivered
    subjects = b"".join(gw.messages("bob@example.test"))
    assert b"Subject: first" in subjects and b"Subject: second" in subjects
    assert b"Re: confirm" not in subjects  # the reply itself is not delivered
    listed = gw.kith("community", "list", "bob@example.test").stdout
    assert "ann@bank.test" in listed and "sav" in listed

    # Now a member: the next message is delivered at once, unchallenged.
    third = message(from_="Ann <ann@bank.test>", subject="third", message_id="<4@bank.test>")
    assert _send(gw, "ann@bank.test", "bob@example.test", third)[-1].code == 250
    gw.wait_for("the member's message", lambda: len(gw.messages("bob@example.test")) == 3)
    assert len(_challenges(outbound)) == 1


def test_forged_token_or_wrong_sender_releases_nothing(gw: Gateway, outbound: Sink) -> None:
    held = message(from_="Ann <ann@bank.test>", subject="held", message_id="<5@bank.test>")
    assert _send(gw, "ann@bank.test", "bob@example.test", held)[-1].code == 250
    (challenge,) = gw.wait_for("the challenge", lambda: _challenges(outbound))
    token_address = TOKEN_ADDRESS.search(challenge)
    assert token_address is not None
    address = token_address[0].decode()
    # A forged token is no token: the reserved local part is nobody.
    forged = address[:9] + ("b" if address[9] != "b" else "c") + address[10:]
    r = _send(gw, "ann@bank.test", forged, message(subject="forged"))[2]
    assert (r.code, r.status) == (550, "5.1.1"), r
    # The real token from another (unauthenticated) sender counts for nothing.
    other = message(from_="Eve <eve@evil.test>", subject="Re", message_id="<6@evil.test>")
    assert _send(gw, "eve@evil.test", address, other)[-1].code == 250
    gw.wait_for("the refused reply logged", lambda: "sav.reply_wrong_sender" in gw.log_text())
    assert gw.messages("bob@example.test") == []
    assert "held" in gw.kith("quarantine", "list", "bob@example.test").stdout


def _http(url: str, data: bytes | None = None, origin: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if origin:
        req.add_header("Origin", origin)
    if data is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_confirmation_page_get_changes_nothing_post_releases(gw: Gateway, outbound: Sink) -> None:
    held = message(from_="Ann <ann@bank.test>", subject="by page", message_id="<7@bank.test>")
    assert _send(gw, "ann@bank.test", "bob@example.test", held)[-1].code == 250
    (challenge,) = gw.wait_for("the challenge", lambda: _challenges(outbound))
    # The text part is quoted-printable: undo its soft line breaks first.
    text = challenge.replace(b"=\r\n", b"").replace(b"=\n", b"")
    link = re.search(rb"http://127\.0\.0\.1:\d+/sav/[a-z2-7]+", text)
    assert link is not None
    url = link[0].decode()
    base = f"http://127.0.0.1:{gw.public_port}"
    assert url.startswith(base + "/sav/"), url  # public_url points at the public listener
    status, page = _http(url)
    assert status == 200 and "by page" in page and "ann@bank.test" in page
    # A scanner following the link changed nothing.
    assert gw.messages("bob@example.test") == []
    tag = re.search(r'name="form" value="([^"]+)"', page)
    assert tag is not None
    status, _ = _http(url, urllib.parse.urlencode({"form": tag[1]}).encode(), origin=base)
    assert status == 200, status
    gw.wait_for("the release", lambda: len(gw.messages("bob@example.test")) == 1)
    # Spent: a second POST does nothing more.
    again, _ = _http(url, urllib.parse.urlencode({"form": tag[1]}).encode(), origin=base)
    assert again == 410, again


def test_outbound_mail_teaches_and_the_reply_is_delivered_without_challenge(
    gw: Gateway, outbound: Sink
) -> None:
    """Mail a user sends out adds its recipients; their reply is delivered at once."""

    async def submit() -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the gateway's self-signed certificate
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=gw.submission_port,
            source_address=("127.0.0.80", 0),
            start_tls=False,
            tls_context=ctx,
            timeout=20,
        )
        await smtp.connect()
        await smtp.starttls()
        await smtp.login("bob@example.test", "correct horse battery staple")
        out = message(
            from_="Bob <bob@example.test>", subject="lunch?", message_id="<o1@example.test>"
        )
        errors, _ = await smtp.sendmail("bob@example.test", ["ann@bank.test"], out)
        assert errors == {}
        await smtp_quit(smtp)

    run(submit())
    gw.wait_for(
        "the outbound copy at the smarthost",
        lambda: [m for m in outbound.messages() if b"Subject: lunch?" in m],
    )
    listed = gw.kith("community", "list", "bob@example.test").stdout
    assert "ann@bank.test" in listed and "outbound" in listed
    # Ann's reply: authenticated (SPF and DMARC pass for bank.test), a member:
    # delivered at once, held for nobody, challenged by nobody.
    reply = message(from_="Ann <ann@bank.test>", subject="Re: lunch?", message_id="<r1@bank.test>")
    assert _send(gw, "ann@bank.test", "bob@example.test", reply)[-1].code == 250
    got = gw.wait_for("the reply in bob's Maildir", lambda: gw.messages("bob@example.test"))
    assert b"Subject: Re: lunch?" in got[0]
    assert _challenges(outbound) == []
    assert "community.member" in gw.log_text()


def test_a_member_from_a_never_seen_server_is_not_deferred_by_recon(
    tmp_path: Path, zones: Dnsmasq, outbound: Sink
) -> None:
    """Members at RCPT (DESIGN.md): SPF pass for a member's MAIL FROM skips Recon."""
    with running_gateway(
        tmp_path / "gw2",
        sections={
            "dns": {"nameservers": [zones.address], "timeout": "1s"},
            "domains": {"outbound": outbound.url},
            "recon": {"min_delay": "1h"},
            "community": {"mode": "enforce"},
        },
    ) as g:
        g.kith("community", "add", "bob@example.test", "ann@bank.test")
        member = message(
            from_="Ann <ann@bank.test>", subject="new server", message_id="<9@bank.test>"
        )
        replies = run(send(g.port, "127.0.0.91", "ann@bank.test", ["bob@example.test"], member))
        assert replies[2].code == 250 and replies[-1].code == 250, replies
        got = g.wait_for("the member's message", lambda: g.messages("bob@example.test"))
        assert b"Subject: new server" in got[0]
        g.wait_for("the recon.member reason", lambda: "recon.member" in g.log_text())
        # A stranger from another never-seen server of the same domain is deferred.
        other = message(from_="Carl <carl@bank.test>", subject="x", message_id="<10@bank.test>")
        r = run(send(g.port, "127.0.0.92", "carl@bank.test", ["bob@example.test"], other))[2]
        assert (r.code, r.status) == (451, "4.7.1"), r
