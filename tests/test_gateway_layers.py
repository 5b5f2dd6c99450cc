"""Recon and Reputation in the gateway, as a mail admin sees them from outside.

`kith serve --test-hooks` runs with a movable clock, so Recon's timings
(min_delay, retry_window, pass_ttl) are exercised without waiting for
them; a real dnsmasq serves the DNSBL zone and logs every query, which
is how the tests know that a deferred new source cost no DNS query.
Clients are bound to addresses across 127.0.0.0/8; only 127.0.0.1 is trusted.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from dns_server import Dnsmasq, StartDnsmasq
from gateway import Gateway, Reply, message, run, running_gateway, send

DNSBL = "zen.example.test"
LISTED = "127.0.0.30"  # the DNSBL lists it


@pytest.fixture
def dnsbl(dnsmasq: StartDnsmasq) -> Dnsmasq:
    return dnsmasq(zones=(DNSBL,), a=[(f"30.0.0.127.{DNSBL}", "127.0.0.2")])


def _rcpt(replies: list[Reply]) -> Reply:
    return replies[2]


def _metrics(gw: Gateway) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.web_port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def _value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{", 1)[0] != name:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


@pytest.fixture
def gw(tmp_path: Path, dnsbl: Dnsmasq) -> Iterator[Gateway]:
    block = tmp_path / "block.txt"
    block.write_text("# the local block list\n127.0.0.60\n")
    with running_gateway(
        tmp_path / "gw",
        sections={
            "dns": {"nameservers": [dnsbl.address]},
            "recon": {
                "min_delay": "60s",
                "retry_window": "1h",
                "exempt_networks": ["127.0.0.0/26"],
            },
            "reputation": {
                "dnsbl": [DNSBL],
                "on_listed": "reject",
                "learned_threshold": 3,
                "learned_action": "defer",
                "local_lists": [{"name": "local", "path": str(block), "kind": "block"}],
            },
        },
    ) as g:
        yield g


def test_recon_cycle_defer_retry_pass_and_known(gw: Gateway, dnsbl: Dnsmasq) -> None:
    ip = "127.0.0.100"
    r = _rcpt(run(send(gw.port, ip, "bob@remote.test", ["ann@example.test"])))
    assert (r.code, r.status) == (451, "4.7.1") and "retry in 60 s" in r.text, r
    gw.advance(30)  # too early: still deferred, and first-seen does not move
    r = _rcpt(run(send(gw.port, ip, "bob@remote.test", ["ann@example.test"])))
    assert (r.code, r.status) == (451, "4.7.1"), r
    # Half the delay is left (the clock counts whole seconds, and a real
    # second may tick between the two sends).
    left = re.search(r"retry in (\d+) s", r.text)
    assert left is not None and int(left[1]) in (29, 30), r
    # No DNS query was spent on the deferred source.
    assert not [q for q in dnsbl.queries() if q[0].startswith("100.0.0.127.")]
    gw.advance(31)
    replies = run(send(gw.port, ip, "bob@remote.test", ["ann@example.test"], message("retry")))
    assert _rcpt(replies).code == 250 and replies[-1].code == 250, replies
    gw.wait_for("the retried message", lambda: gw.messages("ann@example.test"))
    # Now known: another sender and recipient pass at once.
    replies = run(send(gw.port, ip, "carol@elsewhere.test", ["bob@example.test"]))
    assert replies[-1].code == 250, replies
    text = _metrics(gw)
    assert _value(text, "kithmail_recon_delay_seconds_count") >= 1
    assert _value(text, "kithmail_smtp_replies_total", command="RCPT", code="451") >= 2
    assert _value(text, "kithmail_verdicts_total", layer="recon", action="defer") >= 2


def test_retry_window_expired_means_new_again(gw: Gateway) -> None:
    ip = "127.0.0.101"
    assert _rcpt(run(send(gw.port, ip, "bob@remote.test", ["ann@example.test"]))).code == 451
    gw.advance(3700)  # past the 1 h retry window with no retry
    r = _rcpt(run(send(gw.port, ip, "bob@remote.test", ["ann@example.test"])))
    assert (r.code, r.status) == (451, "4.7.1") and "retry in 60 s" in r.text, r


def test_pass_is_renewed_by_accepted_mail(gw: Gateway) -> None:
    ip = "127.0.0.102"
    assert _rcpt(run(send(gw.port, ip, "bob@remote.test", ["ann@example.test"]))).code == 451
    gw.advance(61)
    assert run(send(gw.port, ip, "bob@remote.test", ["ann@example.test"]))[-1].code == 250
    before = _pass_until(gw, ip)
    gw.advance(10 * 86400)  # ten days on, mail from it renews the 30-day pass
    assert run(send(gw.port, ip, "bob@remote.test", ["ann@example.test"]))[-1].code == 250
    gw.wait_for(
        "the renewed pass to be committed",
        lambda: _pass_until(gw, ip) >= before + timedelta(days=9),
    )


def _pass_until(gw: Gateway, ip: str) -> datetime:
    out = gw.kith("recon", "show", ip).stdout
    line = next(x for x in out.splitlines() if x.strip().startswith("pass until"))
    return datetime.fromisoformat(line.strip().split(None, 2)[2].strip())


def test_many_sources_each_deferred_then_passing(gw: Gateway) -> None:
    ips = [f"127.0.1.{i}" for i in range(1, 41)]

    async def all_of(subject: str) -> list[list[Reply]]:
        return await asyncio.gather(
            *(
                send(gw.port, ip, "bob@remote.test", ["ann@example.test"], message(subject))
                for ip in ips
            )
        )

    first = run(all_of("first"))
    assert [_rcpt(r).code for r in first] == [451] * len(ips)
    gw.advance(61)
    second = run(all_of("second"))
    assert [r[-1].code for r in second] == [250] * len(ips)
    gw.wait_for("40 deliveries", lambda: len(gw.messages("ann@example.test")) == len(ips))


def test_dnsbl_listing_rejects_and_clean_source_passes(gw: Gateway, dnsbl: Dnsmasq) -> None:
    r = _rcpt(run(send(gw.port, LISTED, "bob@remote.test", ["ann@example.test"])))
    assert (r.code, r.status) == (554, "5.7.1") and DNSBL in r.text, r
    ok = run(send(gw.port, "127.0.0.31", "bob@remote.test", ["ann@example.test"]))
    assert ok[-1].code == 250, ok
    assert "reputation.dnsbl" in gw.log_text()


def test_local_allow_list_wins_over_dnsbl_and_recon(gw: Gateway, tmp_path: Path) -> None:
    allow = tmp_path / "allow.txt"
    allow.write_text(f"{LISTED}\n127.0.2.0/24\n")
    gw.kith("reputation", "load", str(allow), "--name", "partners", "--kind", "allow")
    assert run(send(gw.port, LISTED, "bob@remote.test", ["ann@example.test"]))[-1].code == 250
    # A never-seen source on the allow list skips Recon too.
    assert run(send(gw.port, "127.0.2.9", "bob@remote.test", ["ann@example.test"]))[-1].code == 250


def test_local_block_list_from_config(gw: Gateway) -> None:
    r = _rcpt(run(send(gw.port, "127.0.0.60", "bob@remote.test", ["ann@example.test"])))
    assert (r.code, r.status) == (554, "5.7.1"), r


def test_unknown_recipients_teach_a_learned_score_that_defers(gw: Gateway) -> None:
    ip = "127.0.0.40"
    for name in ("nobody", "noone", "ghost"):
        r = _rcpt(run(send(gw.port, ip, "spammer@remote.test", [f"{name}@example.test"])))
        assert (r.code, r.status) == (550, "5.1.1"), r
    r = _rcpt(run(send(gw.port, ip, "spammer@remote.test", ["ann@example.test"])))
    assert (r.code, r.status) == (451, "4.7.1"), r  # learned_action = defer, never reject
    # Another source is not affected.
    assert run(send(gw.port, "127.0.0.41", "bob@remote.test", ["ann@example.test"]))[-1].code == 250


def test_shadow_mode_records_without_acting(tmp_path: Path) -> None:
    with running_gateway(tmp_path / "gw", sections={"recon": {"mode": "shadow"}}) as gw:
        replies = run(send(gw.port, "127.0.0.150", "bob@remote.test", ["ann@example.test"]))
        assert replies[-1].code == 250, replies
        got = gw.wait_for("the shadow-mode delivery", lambda: gw.messages("ann@example.test"))
        assert b"X-Kithmail-Verdict: recon=defer shadow; reason=recon.new_source" in got[0]
        assert _value(_metrics(gw), "kithmail_verdicts_total", layer="recon", shadow="yes") == 1
