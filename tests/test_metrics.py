"""/metrics of a running `kith serve`, read as Prometheus reads it, checked against the mail sent.

A real gateway (tests/gateway.py) with layer 5 enforcing and no DNS that
answers: mail from outside is deferred by Recon, then passes on its retry
after an SPF check whose TXT query fails; every message the community
does not know is held, and its SAV challenge suppressed (the sender is not
authenticated). The page must say exactly that, with closed label sets.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway import Gateway, message, run, running_gateway, send
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import Samples, scrape
from smtp_fixtures import wait_no_sessions
from test_quarantine import ANN, DAYS, make_world

DAY = 86400

TRUSTED = "127.0.0.1"
OUTSIDE = "127.0.0.2"

# Every family a default gateway exports before any special event.
ALWAYS = {
    "kithmail_smtp_connections",
    "kithmail_smtp_sessions",
    "kithmail_smtp_session_seconds",
    "kithmail_smtp_replies",
    "kithmail_smtp_messages",
    "kithmail_smtp_message_bytes",
    "kithmail_verdicts",
    "kithmail_layer_seconds",
    "kithmail_delivery_attempts",
    "kithmail_queue_messages",
    "kithmail_queue_oldest_seconds",
    "kithmail_core_rows",
    "kithmail_core_map_size_bytes",
    "kithmail_core_map_used_bytes",
    "kithmail_quarantine_messages",
    "kithmail_quarantine_bytes",
    "kithmail_spool_filesystem_avail_bytes",
    "kithmail_spool_filesystem_size_bytes",
    "process_resident_memory_bytes",
    "process_cpu_seconds",
    "process_open_fds",
}

_IP = re.compile(r"\b\d{1,3}(\.\d{1,3}){3}\b|[0-9a-f]{0,4}:[0-9a-f]{0,4}:[0-9a-f:]*", re.I)


def _assert_conventions(page: Samples) -> None:
    """Prometheus conventions: our prefix, _total counters, no address or IP as a label."""
    for name, kind in page.families.items():
        assert name.startswith(("kithmail_", "process_", "python_")), name
        if name.startswith("kithmail_") and kind == "counter":
            assert page.has(name + "_total") or not page.find(name), name
    for s in page.samples:
        for k, v in s.labels.items():
            assert "@" not in v and not _IP.search(v), f"{s.name}{{{k}={v!r}}}: an address"


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    with running_gateway(tmp_path / "gw", sections={"community": {"mode": "enforce"}}) as g:
        yield g


def test_metrics_count_what_was_sent(gw: Gateway) -> None:
    # The fixture's readiness probe opened one session or more (it retries until
    # every worker says ready): count from here.
    wait_no_sessions(gw)
    sessions_before = scrape(gw.web_port).value("kithmail_smtp_session_seconds_count")
    # 1. From the trusted network: accepted, held by layer 5, challenge suppressed.
    r = run(send(gw.port, TRUSTED, "bob@remote.test", ["ann@example.test"]))
    assert r[-1].code == 250, r
    # 2. From outside, never seen: Recon defers at RCPT.
    r = run(send(gw.port, OUTSIDE, "carl@remote.test", ["ann@example.test"]))
    assert r[2].code == 451, r
    # 3. An unknown recipient: 550 at RCPT.
    r = run(send(gw.port, TRUSTED, "bob@remote.test", ["nobody@example.test"]))
    assert r[2].code == 550, r
    # 4. The outside source retries after min_delay: SPF asks the (dead) DNS, mail held.
    gw.advance(3)
    r = run(send(gw.port, OUTSIDE, "carl@remote.test", ["ann@example.test"], message("retry")))
    assert r[-1].code == 250, r

    wait_no_sessions(gw)
    page = scrape(gw.web_port)
    _assert_conventions(page)
    assert set(page.families) >= ALWAYS, ALWAYS - set(page.families)

    assert page.value("kithmail_smtp_messages_total", result="accepted") == 2
    assert (
        page.value("kithmail_smtp_replies_total", command="RCPT", code="451", **{"class": "4xx"})
        == 1
    )
    assert page.value("kithmail_smtp_replies_total", command="RCPT", **{"class": "5xx"}) == 1
    assert page.value("kithmail_smtp_replies_total", command="DATA", **{"class": "2xx"}) == 2
    assert page.value("kithmail_verdicts_total", layer="recon", action="defer", shadow="no") == 1
    assert page.value("kithmail_smtp_session_seconds_count") == sessions_before + 4

    # Both held copies, by the layer that held them, and their bytes.
    assert page.value("kithmail_quarantine_messages", layer="community") == 2
    held = [p.stat().st_size for p in (gw.data_dir / "spool" / "active").glob("*") if p.is_file()]
    assert page.value("kithmail_quarantine_bytes", layer="community") > 0
    assert held, "the held messages are in the spool"
    assert page.value("kithmail_sav_challenges_suppressed_total", reason="sav.unauthenticated") == 2
    assert page.value("kithmail_sav_challenges_total", result="sent") == 0

    # The retry's SPF check asked for TXT and got no answer (nothing listens).
    txt = page.value("kithmail_dns_queries_total", type="TXT")
    failed = page.value("kithmail_dns_queries_total", type="TXT", result="failure") + page.value(
        "kithmail_dns_queries_total", type="TXT", result="timeout"
    )
    assert txt >= 1 and failed == txt
    assert page.value("kithmail_dns_query_seconds_count", type="TXT") == txt

    # The core: the outside source is a Recon row; the map is in use.
    assert page.value("kithmail_core_rows", table="recon") >= 1
    used = page.value("kithmail_core_map_used_bytes")
    assert 0 < used <= page.value("kithmail_core_map_size_bytes")

    # The spool's filesystem, as statvfs sees it.
    st = os.statvfs(gw.data_dir / "spool")
    assert page.value("kithmail_spool_filesystem_size_bytes") == st.f_blocks * st.f_frsize
    assert 0 < page.value("kithmail_spool_filesystem_avail_bytes") <= st.f_blocks * st.f_frsize

    # Process metrics of the one process.
    assert page.value("process_resident_memory_bytes") > 1 << 20
    assert page.value("process_open_fds") > 3


def test_several_workers_merge_and_each_reports_its_process(tmp_path: Path) -> None:
    with running_gateway(tmp_path / "gw", sections={"server": {"workers": 2}}) as gw:
        gw.wait_for("both workers", lambda: gw.log_text().count("kithmail ready") == 2)
        for i in range(4):
            r = run(
                send(gw.port, TRUSTED, "bob@remote.test", ["ann@example.test"], message(f"m{i}"))
            )
            assert r[-1].code == 250, r
        page = scrape(gw.web_port)
        _assert_conventions(page)
        # Whichever worker took each session, the page counts them all.
        assert page.value("kithmail_smtp_messages_total", result="accepted") == 4
        workers = {s.labels.get("worker") for s in page.find("process_resident_memory_bytes")}
        assert workers == {"main", "0", "1"}
        for w in ("main", "0", "1"):
            assert page.value("process_resident_memory_bytes", worker=w) > 1 << 20
            assert page.value("process_open_fds", worker=w) > 0
            assert page.has("process_cpu_seconds_total", worker=w)
        assert page.value("kithmail_core_rows", table="community") >= 0
        assert page.has("kithmail_spool_filesystem_avail_bytes")


def test_retention_counts_expired_copies(tmp_path: Path) -> None:
    """The sweep that deletes held copies past quarantine_days counts them."""

    def expired() -> float:
        for fam in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
            for s in fam.samples:
                if s.name == "kithmail_quarantine_expired_total":
                    return float(s.value)
        return 0.0

    world = make_world(tmp_path / "var")
    try:
        world.db.add_user(ANN, password="correct horse")
        before = expired()
        now = world.clock.t
        world.held(subject="old", received=now - DAYS * DAY - 1)
        world.held(subject="older", received=now - DAYS * DAY - 2)
        world.held(subject="young", received=now)
        assert world.q.sweep_sync(now).deleted == 2
        assert expired() == before + 2
        assert world.q.sweep_sync(now).deleted == 0
        assert expired() == before + 2
    finally:
        world.db.close()


def test_recon_rows_are_swept_after_their_time(tmp_path: Path) -> None:
    """A never-retried source is forgotten after retry_window (the privacy promise of docs/retention.md)."""
    with running_gateway(tmp_path / "gw", sections={"recon": {"retry_window": "1h"}}) as gw:
        for source in ("127.0.0.2", "127.0.0.3"):
            r = run(send(gw.port, source, "carl@remote.test", ["ann@example.test"]))
            assert r[2].code == 451, r
        gw.wait_for(
            "two Recon rows",
            lambda: scrape(gw.web_port).value("kithmail_core_rows", table="recon") == 2,
        )
        # The sweep runs at start and every minute; a restart after the
        # window has passed (on the test clock) shows it without waiting.
        gw.advance(3601)
        gw.restart()
        gw.wait_for(
            "the rows swept",
            lambda: scrape(gw.web_port).value("kithmail_core_rows", table="recon") == 0,
        )
