"""The dashboard's per-day counters (kithmail.stats): real SQLite, and a real `kith serve`.

What an admin relies on: a message turned away by Recon shows as a Recon
deferral of its tenant and its source's /24; a delivered one as the layers'
accepts and a delivery; counts reach the database within a flush and
survive a stop; old days go; a flood of sources cannot grow memory or the
table without bound.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway import Gateway, run, running_gateway, send

from kithmail import stats
from kithmail.db import Database, DatabaseError
from kithmail.layers import Action, Layer, Verdict
from kithmail.spool import Outcome, Recipient
from kithmail.stats import Stats, day_of, read_daily, read_per_day, read_sources


class Clock:
    def __init__(self, t: float = 1_764_000_000.0) -> None:  # 2025-11-24 16:00 UTC
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    d = Database.open(tmp_path / "kithmail.db")
    yield d
    d.close()


TENANTS = {"example.test": "acme", "other.test": "globex"}


def make(clock: Clock) -> Stats:
    return Stats(clock, TENANTS.get)


def v(layer: Layer, action: Action, reason: str, shadow: bool = False) -> Verdict:
    return Verdict(layer, action, reason, shadow=shadow)


def test_a_recon_deferral_counts_for_its_tenant_layer_and_source(database: Database) -> None:
    clock = Clock()
    s = make(clock)
    s.transaction(
        tenant=None,
        client="198.51.100.7",
        trusted=False,
        reply=None,
        refused=[("ann@example.test", "451 4.7.1 Greylisted", "recon.new_source")],
    )
    assert s.flush_sync(database) == 3
    today = [day_of(clock())]
    assert read_daily(database, today, "acme") == {("recon", "defer"): 1, ("gateway", "defer"): 1}
    assert read_daily(database, today, "globex") == {}
    assert read_sources(database, today, "acme", "defer") == [
        stats.SourceCount("198.51.100.0/24", 1)
    ]
    assert read_sources(database, today, "globex", "defer") == []


def test_layers_count_their_most_severe_action_per_recipient(database: Database) -> None:
    clock = Clock()
    s = make(clock)
    spoofing = [
        v(Layer.SPOOFING, Action.ACCEPT, "spf.pass"),
        v(Layer.SPOOFING, Action.QUARANTINE, "dkim.fail"),
        v(Layer.SPOOFING, Action.ACCEPT, "dmarc.none"),
    ]
    s.transaction(
        tenant="acme",
        client="2001:db8:1:2::9",
        trusted=False,
        reply=None,
        refused=[],
        recipients=[
            Recipient("ann@example.test", Outcome.QUARANTINE, (*spoofing,)),
            Recipient(
                "bob@example.test",
                Outcome.DELIVER,
                (
                    v(Layer.RECON, Action.ACCEPT, "recon.passed"),
                    v(Layer.COMMUNITY, Action.QUARANTINE, "community.unknown", shadow=True),
                ),
            ),
        ],
    )
    s.flush_sync(database)
    got = read_daily(database, [day_of(clock())], "acme")
    assert got == {
        ("spoofing", "quarantine"): 1,  # three verdicts, one recipient held by the layer
        ("recon", "accept"): 1,
        ("community", "quarantine/shadow"): 1,
        ("gateway", "quarantine"): 1,
        ("gateway", "deliver"): 1,
    }
    # Accepted mail names no source.
    assert read_sources(database, [day_of(clock())], None, "defer") == []


def test_a_refusal_at_end_of_data_counts_each_recipient_and_the_ipv6_48(
    database: Database,
) -> None:
    clock = Clock()
    s = make(clock)
    s.transaction(
        tenant="globex",
        client="2001:db8:1:2::9",
        trusted=False,
        reply="554 5.7.1 Virus found",
        refused=[],
        rcpt_verdicts=[[v(Layer.RECON, Action.ACCEPT, "recon.passed")], []],
        message_verdicts=[v(Layer.ANTIVIRUS, Action.REJECT, "antivirus.virus")],
    )
    s.flush_sync(database)
    today = [day_of(clock())]
    assert read_daily(database, today, "globex") == {
        ("recon", "accept"): 1,
        ("antivirus", "reject"): 2,
        ("gateway", "reject"): 2,
    }
    assert read_sources(database, today, "globex", "reject") == [
        stats.SourceCount("2001:db8:1::/48", 2)
    ]


def test_our_own_faults_and_trusted_clients_name_no_source(database: Database) -> None:
    clock = Clock()
    s = make(clock)
    s.transaction(
        tenant="acme",
        client="198.51.100.7",
        trusted=False,
        reply="452 4.3.1 Insufficient system storage",
        refused=[],
        rcpt_verdicts=[[]],
        by_policy=False,
    )
    s.transaction(
        tenant=None,
        client="127.0.0.1",
        trusted=True,
        reply=None,
        refused=[("nobody@example.test", "550 5.1.1 No such user", "recipient.unknown")],
    )
    s.flush_sync(database)
    today = [day_of(clock())]
    assert read_daily(database, today, "acme") == {
        ("smtp", "defer"): 1,
        ("smtp", "reject"): 1,
        ("gateway", "defer"): 1,
        ("gateway", "reject"): 1,
    }
    assert read_sources(database, today, None, "defer") == []
    assert read_sources(database, today, None, "reject") == []


def test_counts_add_up_over_flushes_and_days_and_old_days_go(database: Database) -> None:
    clock = Clock()
    s = make(clock)
    refused = [("ann@example.test", "451 4.7.1 Greylisted", "recon.new_source")]
    first = day_of(clock())
    for _ in range(3):
        s.transaction(
            tenant=None, client="198.51.100.7", trusted=False, reply=None, refused=refused
        )
        s.flush_sync(database)
    clock.t += 86400
    s.transaction(tenant=None, client="198.51.100.7", trusted=False, reply=None, refused=refused)
    s.flush_sync(database)
    week = stats.days_back(clock(), 7)
    assert read_per_day(database, week, "acme")[first] == {"defer": 3}
    assert read_per_day(database, week, "acme")[day_of(clock())] == {"defer": 1}
    assert read_daily(database, week, None)[("recon", "defer")] == 4
    # Eight days on, the first day is pruned at the next flush, the second kept.
    clock.t += (stats.KEEP_DAYS - 1) * 86400
    s.flush_sync(database)
    days = [str(r[0]) for r in database.read("SELECT DISTINCT day FROM stats_daily")]
    assert days == [day_of(clock() - (stats.KEEP_DAYS - 1) * 86400)]
    assert database.read("SELECT count(*) FROM stats_sources WHERE day = ?", (first,)) == [(0,)]


def test_a_finished_days_sources_are_trimmed_to_the_top(database: Database) -> None:
    clock = Clock()
    s = make(clock)
    keep = stats.KEEP_SOURCES
    for i in range(keep + 50):
        refused = [("ann@example.test", "550 5.7.1 Listed", "reputation.dnsbl")] * (
            3 if i < 5 else 1
        )
        s.transaction(
            tenant=None,
            client=f"10.{i // 256}.{i % 256}.1",
            trusted=False,
            reply=None,
            refused=refused,
        )
    s.flush_sync(database)
    day = day_of(clock())
    assert database.read("SELECT count(*) FROM stats_sources WHERE day = ?", (day,)) == [
        (keep + 50,)
    ]
    clock.t += 86400
    s.flush_sync(database)
    assert database.read("SELECT count(*) FROM stats_sources WHERE day = ?", (day,)) == [(keep,)]
    top = read_sources(database, [day], "acme", "reject", limit=5)
    assert [t.n for t in top] == [3] * 5
    assert {t.source for t in top} == {f"10.0.{i}.0/24" for i in range(5)}


def test_a_flood_of_sources_is_bounded_in_memory(database: Database) -> None:
    clock = Clock()
    s = Stats(clock, TENANTS.get, max_keys=10)
    for i in range(50):
        s.transaction(
            tenant=None,
            client=f"10.0.{i}.1",
            trusted=False,
            reply=None,
            refused=[("ann@example.test", "451 4.7.1 Greylisted", "recon.new_source")],
        )
    assert s.pending() <= 20
    assert s.dropped > 0
    s.flush_sync(database)
    assert read_daily(database, [day_of(clock())], "acme")[("recon", "defer")] == 50


def test_a_failed_flush_keeps_the_counts_for_the_next(tmp_path: Path) -> None:
    clock = Clock()
    s = make(clock)
    s.transaction(
        tenant=None,
        client="198.51.100.7",
        trusted=False,
        reply=None,
        refused=[("ann@example.test", "451 4.7.1 Greylisted", "recon.new_source")],
    )
    closed = Database.open(tmp_path / "a.db")
    closed.close()
    with pytest.raises(DatabaseError):
        s.flush_sync(closed)
    with Database.open(tmp_path / "b.db") as good:
        s.flush_sync(good)
        assert read_daily(good, [day_of(clock())], "acme")[("recon", "defer")] == 1


def test_source_of_masks_v4_v6_and_refuses_garbage() -> None:
    assert stats.source_of("192.0.2.200") == "192.0.2.0/24"
    assert stats.source_of("::ffff:192.0.2.200") == "192.0.2.0/24"
    assert stats.source_of("2001:db8:aa:bb::1") == "2001:db8:aa::/48"
    assert stats.source_of("") is None
    assert stats.source_of("not an address") is None
    assert stats.layer_of_reason("spf.softfail") == "spoofing"
    assert stats.layer_of_reason("recipient.unknown") == "smtp"


# ---------------------------------------------------------------- a real gateway


def _daily(gw: Gateway) -> dict[tuple[str, str, str], int]:
    with Database.open(gw.data_dir / "kithmail.db") as d:
        return {
            (str(t), str(layer), str(a)): int(str(n))
            for t, layer, a, n in d.read("SELECT tenant, layer, action, n FROM stats_daily")
        }


def test_the_gateway_counts_what_it_decided(tmp_path: Path) -> None:
    with running_gateway(tmp_path / "gw") as gw:
        replies = run(send(gw.port, "127.0.0.9", "x@remote.test", ["ann@example.test"]))
        assert (replies[2].code, replies[2].status) == (451, "4.7.1")
        replies = run(send(gw.port, "127.0.0.9", "x@remote.test", ["nobody@example.test"]))
        assert replies[2].code == 550
        gw.advance(3)  # past min_delay (2 s)
        replies = run(send(gw.port, "127.0.0.9", "x@remote.test", ["ann@example.test"]))
        assert replies[-1].code == 250, replies
        gw.wait_for("the delivery", lambda: gw.messages("ann@example.test"))
        # Counts reach the database within a flush (10 s), whatever else happens.
        deadline = time.monotonic() + 30
        while ("default", "gateway", "deliver") not in _daily(gw) and time.monotonic() < deadline:
            time.sleep(0.2)
        daily = _daily(gw)
    assert daily[("default", "recon", "defer")] == 1
    assert daily[("default", "smtp", "reject")] == 1
    assert daily[("default", "recon", "accept")] == 1
    assert daily[("default", "gateway", "deliver")] == 1
    assert daily[("default", "gateway", "defer")] == 1
    assert daily[("default", "gateway", "reject")] == 1
    with Database.open(gw.data_dir / "kithmail.db") as d:
        sources = d.read("SELECT tenant, source, action, n FROM stats_sources ORDER BY action")
    assert sources == [
        ("default", "127.0.0.0/24", "defer", 1),
        ("default", "127.0.0.0/24", "reject", 1),
    ]


def test_journal_copies_and_sav_replies_are_not_counted_as_discarded_mail(
    database: Database,
) -> None:
    clock = Clock()
    s = make(clock)
    s.transaction(
        tenant="acme",
        client="127.0.0.1",
        trusted=True,
        reply=None,
        refused=[],
        recipients=[
            Recipient(
                "journal@example.test",
                Outcome.DISCARD,
                (v(Layer.COMMUNITY, Action.DISCARD, "journal.learned"),),
            ),
            Recipient(
                "sav+x@example.test",
                Outcome.DISCARD,
                (v(Layer.COMMUNITY, Action.DISCARD, "sav.verified"),),
            ),
            Recipient(
                "ann@example.test",
                Outcome.DISCARD,
                (v(Layer.COMMUNITY, Action.DISCARD, "community.blocked"),),
            ),
        ],
    )
    s.flush_sync(database)
    assert read_daily(database, [day_of(clock())], "acme") == {
        ("community", "discard"): 1,
        ("gateway", "discard"): 1,
    }


def test_a_relay_attempt_is_no_tenants_even_beside_a_local_recipient(database: Database) -> None:
    clock = Clock()
    s = make(clock)
    s.transaction(
        tenant="acme",
        client="198.51.100.7",
        trusted=False,
        reply=None,
        refused=[("victim@elsewhere.test", "554 5.7.1 Relay access denied", "relay.denied")],
    )
    s.flush_sync(database)
    today = [day_of(clock())]
    assert read_daily(database, today, "acme") == {}
    assert read_daily(database, today, "") == {("smtp", "reject"): 1, ("gateway", "reject"): 1}
    assert read_sources(database, today, "", "reject") == [stats.SourceCount("198.51.100.0/24", 1)]


def test_every_workers_counts_reach_the_database(tmp_path: Path) -> None:
    """With two workers sharing the port, each flushes its own counts; none are lost at stop."""
    n = 16  # both workers serve some: all on one would be a 1 in 32768 chance
    with running_gateway(tmp_path / "gw", sections={"server": {"workers": 2}}) as gw:
        for i in range(n):
            replies = run(send(gw.port, f"127.0.{i + 1}.9", "x@remote.test", ["ann@example.test"]))
            assert replies[2].code == 451
        served = set(re.findall(r"kithmail\.smtp\.transaction\[(\d+)\] transaction", gw.log_text()))
        assert len(served) == 2, served
    daily = _daily(gw)
    assert daily[("default", "recon", "defer")] == n
    with Database.open(gw.data_dir / "kithmail.db") as d:
        sources = d.read("SELECT count(*), sum(n) FROM stats_sources WHERE action = 'defer'")
    assert sources == [(n, n)]


def test_a_failing_tenant_lookup_loses_the_count_never_the_session(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(domain: str) -> str | None:
        raise DatabaseError("database is locked")

    s = Stats(Clock(), broken)
    refused = [("ann@example.test", "451 4.7.1 Greylisted", "recon.new_source")]
    for _ in range(2):
        s.transaction(
            tenant=None, client="198.51.100.7", trusted=False, reply=None, refused=refused
        )
    assert s.dropped == 2
    assert caplog.text.count("could not be counted") == 1  # said once, not per message
