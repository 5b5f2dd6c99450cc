"""Layers 3 and 4 in the gateway, end to end: real DNS zones, a real clamd, real SMTP.

A dnsmasq serves SPF records, DKIM keys and DMARC policies (the zones of
`auth_zones`, plus SPF records here); a clamd with the tests' own
signatures scans every message; `kith serve` judges mail sent over SMTP
from loopback addresses that Recon exempts (Recon is not what these tests
are about). What an admin checks: SPF refuses at RCPT with RFC 7372's
codes; a signed, aligned message is delivered with one Authentication-
Results header that says so; a forged From of a DMARC p=reject domain and
a forged own domain are refused at the end of DATA; a softfail is held,
not delivered; a virus is refused with its signature named.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from auth_zones import ZONES, message, records, sign
from clamd_server import EICAR, EICAR_NAME, Clamd, clamd_server
from dns_server import Dnsmasq, StartDnsmasq
from gateway import Gateway, Reply, run, running_gateway, send

OUTSIDE = "127.0.0.70"
SPF = [
    ("bank.test", "v=spf1 ip4:127.0.0.0/24 -all"),
    ("fail.test", "v=spf1 ip4:192.0.2.0/24 -all"),
    ("soft.test", "v=spf1 ip4:192.0.2.0/24 ~all"),
]


@pytest.fixture
def zones(dnsmasq: StartDnsmasq) -> Dnsmasq:
    return dnsmasq(zones=(*ZONES, "fail.test", "soft.test"), txt=[*records(), *SPF])


@pytest.fixture
def clamd(tmp_path: Path) -> Iterator[Clamd]:
    with clamd_server(tmp_path / "clamd") as c:
        yield c


@pytest.fixture
def gw(tmp_path: Path, zones: Dnsmasq, clamd: Clamd) -> Iterator[Gateway]:
    with running_gateway(
        tmp_path / "gw",
        sections={
            "dns": {"nameservers": [zones.address], "timeout": "1s"},
            "spf": {"temperror": "defer"},
            "recon": {"exempt_networks": ["127.0.0.0/24"]},
            "antivirus": {"clamd": clamd.unix},
        },
    ) as g:
        yield g


def _send(gw: Gateway, sender: str, data: bytes) -> list[Reply]:
    return run(send(gw.port, OUTSIDE, sender, ["ann@example.test"], data))


def _auth_results(delivered: bytes) -> list[str]:
    head = delivered.split(b"\n\n", 1)[0].replace(b"\r\n", b"\n").decode()
    fields = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] += " " + line.strip()
        else:
            fields.append(line)
    return [f for f in fields if f.lower().startswith("authentication-results:")]


def test_spf_fail_is_refused_at_rcpt_with_rfc7372_codes(gw: Gateway) -> None:
    r = _send(gw, "x@fail.test", message(from_="x@fail.test"))[2]
    assert (r.code, r.status) == (550, "5.7.23"), r
    assert gw.messages("ann@example.test") == []
    gw.wait_for("the refusal in the log", lambda: '"reason":"spf.fail"' in gw.log_text())


def test_signed_aligned_mail_is_delivered_with_one_authentication_results(gw: Gateway) -> None:
    msg = sign(message(from_="Ann <ann@bank.test>"), "bank.test")
    replies = _send(gw, "ann@bank.test", msg)
    assert replies[-1].code == 250, replies
    got = gw.wait_for("the delivery", lambda: gw.messages("ann@example.test"))
    ar = _auth_results(got[0])
    assert len(ar) == 1, ar
    assert ar[0].startswith("Authentication-Results: mx.kithmail.test;"), ar
    for result in ("spf=pass", "dkim=pass", "dmarc=pass"):
        assert result in ar[0], ar


def test_forged_from_of_a_dmarc_reject_domain_is_refused(gw: Gateway) -> None:
    # The envelope's domain publishes no SPF (none: accepted at RCPT);
    # the header From claims bank.test, whose DMARC says p=reject, and
    # nothing aligned with it authenticates the message.
    msg = message(from_="Bank <alerts@bank.test>", message_id="<f1@evil.test>")
    replies = _send(gw, "x@evil.test", msg)
    done = replies[-1]
    assert (done.code, done.status) == (550, "5.7.1"), replies
    assert "DMARC" in done.text
    assert gw.messages("ann@example.test") == []


def test_own_domain_from_outside_unauthenticated_is_refused(gw: Gateway) -> None:
    replies = _send(gw, "x@evil.test", message(from_="CEO <ceo@example.test>"))
    assert (replies[-1].code, replies[-1].status) == (550, "5.7.1"), replies
    assert gw.messages("ann@example.test") == []
    gw.wait_for("the reason in the log", lambda: "spoofing.own_domain" in gw.log_text())


def test_spf_softfail_is_held_not_delivered(gw: Gateway) -> None:
    replies = _send(gw, "y@soft.test", message(from_="y@soft.test"))
    assert replies[-1].code == 250, replies
    listed = json.loads(gw.kith("queue", "list", "--json").stdout)
    assert [r["state"] for m in listed for r in m["recipients"]] == ["held"], listed
    assert gw.messages("ann@example.test") == []


def test_a_virus_is_refused_and_named_a_clean_message_passes(gw: Gateway) -> None:
    infected = message(from_="Ann <ann@bank.test>", body="see\r\n" + EICAR.decode() + "\r\n")
    replies = _send(gw, "ann@bank.test", sign(infected, "bank.test"))
    done = replies[-1]
    assert (done.code, done.status) == (554, "5.7.0"), replies
    assert EICAR_NAME in done.text
    clean = sign(message(from_="Ann <ann@bank.test>", message_id="<c1@bank.test>"), "bank.test")
    assert _send(gw, "ann@bank.test", clean)[-1].code == 250
    got = gw.wait_for("the clean delivery", lambda: gw.messages("ann@example.test"))
    assert len(got) == 1 and EICAR not in got[0]
