"""The quarantine's allow and block end to end, and its quota and reserve at end of DATA.

`kith serve` with layer 5 enforcing and a dnsmasq serving SPF and DMARC for
the outside sender's domain, so its identity is authenticated (as in
test_gateway_community.py); a Postfix `smtp-sink` takes the SAV challenges.
Community entries are set up and taught with the real `kith community` and
`kith quarantine` commands over the running server's data directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from auth_zones import ZONES, message, records
from dns_server import Dnsmasq, StartDnsmasq
from gateway import Gateway, Reply, run, running_gateway, send
from sink import Sink, smtp_sink

OUTSIDE = "127.0.0.70"
SPF = [("bank.test", "v=spf1 ip4:127.0.0.0/24 -all")]
MEMBER, STRANGER, BLOCKING, LATER = (
    "mia@example.test",
    "sam@example.test",
    "bea@example.test",
    "tom@example.test",
)
USERS = (MEMBER, STRANGER, BLOCKING, LATER)


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
        users=USERS,
        sections={
            "dns": {"nameservers": [zones.address], "timeout": "1s"},
            "domains": {"outbound": outbound.url},
            "recon": {"exempt_networks": ["127.0.0.0/24"]},
            "community": {"mode": "enforce"},
        },
    ) as g:
        yield g


def _send(gw: Gateway, rcpts: list[str], data: bytes) -> list[Reply]:
    return run(send(gw.port, OUTSIDE, "ann@bank.test", rcpts, data))


def _held(gw: Gateway, user: str) -> list[dict[str, object]]:
    doc: list[dict[str, object]] = json.loads(gw.kith("quarantine", "list", user, "--json").stdout)
    return doc


def test_one_message_three_ways_then_allow_and_block_teach(gw: Gateway) -> None:
    gw.kith("community", "add", MEMBER, "ann@bank.test")
    gw.kith("community", "add", BLOCKING, "ann@bank.test", "--block")
    first = message(from_="Ann <ann@bank.test>", subject="first", message_id="<q1@bank.test>")
    got = _send(gw, list(USERS), first)
    assert got[-1].code == 250, got

    # Delivered to the member, held for the strangers, dropped for the blocker.
    gw.wait_for("the member's copy", lambda: gw.messages(MEMBER))
    assert gw.messages(STRANGER) == [] and gw.messages(LATER) == []
    assert gw.messages(BLOCKING) == [] and _held(gw, BLOCKING) == []
    (sam,) = _held(gw, STRANGER)
    (tom,) = _held(gw, LATER)
    assert (sam["rcpt_index"], tom["rcpt_index"]) == (1, 3)

    # The stranger's user allows the sender: the held copy is delivered.
    out = gw.kith("quarantine", "allow", str(sam["queue_id"]), "1").stdout
    assert f"ann@bank.test: added to the allow list of {STRANGER}" in out
    gw.wait_for("the released copy", lambda: gw.messages(STRANGER))
    # The other user blocks the sender: the held copy is gone.
    out = gw.kith("quarantine", "block", str(tom["queue_id"]), "3").stdout
    assert f"ann@bank.test: added to the block list of {LATER}" in out
    assert _held(gw, LATER) == []
    listed = gw.kith("community", "list", STRANGER).stdout
    assert "ann@bank.test" in listed and "manual" in listed

    # The next message from the sender: delivered to the allowing user at
    # once, discarded for the blocking one.
    second = message(from_="Ann <ann@bank.test>", subject="second", message_id="<q2@bank.test>")
    assert _send(gw, list(USERS), second)[-1].code == 250
    gw.wait_for("the second to the member", lambda: len(gw.messages(MEMBER)) == 2)
    gw.wait_for("the second to the taught user", lambda: len(gw.messages(STRANGER)) == 2)
    assert gw.messages(BLOCKING) == [] and gw.messages(LATER) == []
    assert _held(gw, LATER) == [] and _held(gw, STRANGER) == [] and _held(gw, BLOCKING) == []
    assert b"Subject: first" in gw.messages(STRANGER)[0]


def test_a_full_quarantine_defers_held_only_mail_never_a_member_s(
    tmp_path: Path, zones: Dnsmasq, outbound: Sink
) -> None:
    with running_gateway(
        tmp_path / "gw",
        users=USERS,
        sections={
            "dns": {"nameservers": [zones.address], "timeout": "1s"},
            "domains": {"outbound": outbound.url},
            "recon": {"exempt_networks": ["127.0.0.0/24"]},
            "community": {"mode": "enforce", "quarantine_quota": "1KiB"},
        },
    ) as gw:
        gw.kith("community", "add", MEMBER, "ann@bank.test")
        big = "x" * 600 + "\r\n"

        def msg(n: int) -> bytes:
            return message(subject=f"m{n}", message_id=f"<f{n}@bank.test>", body=big)

        # The first fills the stranger's quarantine (an empty one takes any message).
        assert _send(gw, [STRANGER], msg(1))[-1].code == 250
        assert len(_held(gw, STRANGER)) == 1
        # Held only, over quota: deferred, and nothing is kept.
        r = _send(gw, [STRANGER], msg(2))[-1]
        assert (r.code, r.status) == (452, "4.2.2"), r
        assert "quarantine of sam@example.test is full" in r.text
        assert len(_held(gw, STRANGER)) == 1
        # Another user's quarantine is not full.
        assert _send(gw, [LATER], msg(3))[-1].code == 250
        # With a member among the recipients, it is accepted, held copy and all.
        assert _send(gw, [MEMBER, STRANGER], msg(4))[-1].code == 250
        gw.wait_for("the member's copy", lambda: gw.messages(MEMBER))
        assert len(_held(gw, STRANGER)) == 2
