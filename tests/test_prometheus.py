"""A real Prometheus scrapes a real `kith serve`; its answers must match the mail the test sent.

One scenario, shared by the tests of this module (and by test_contrib.py's
check of the dashboard against a real scrape): a real clamd with a daily
database two days old, layer 5 enforcing, DNS that never answers. Mail:
three messages from the trusted network (accepted, scanned clean, held by
layer 5, their challenges suppressed: not authenticated); one with the
EICAR string (rejected by the anti-virus layer at end of DATA); one
recipient that does not exist (550 at RCPT); two outside sources deferred
by Recon, one of which retries after min_delay (an SPF TXT query that
fails, then accepted and held). Prometheus scrapes every second with
contrib/prometheus/alerts.yml loaded; the tests ask its HTTP API.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from clamd_server import EICAR, Clamd, clamd_server
from gateway import Gateway, message, run, running_gateway, send
from prometheus_server import Prometheus, Samples, prometheus_server, scrape

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
ALERTS = CONTRIB / "prometheus" / "alerts.yml"
DASHBOARD = CONTRIB / "grafana" / "kithmail.json"
TWO_DAYS = 2 * 86400

ACCEPTED_TRUSTED = 3


@dataclass
class Scenario:
    gw: Gateway
    clamd: Clamd
    page: Samples  # a scrape after all the mail was sent


@contextlib.contextmanager
def exercised_gateway(tmp_path: Path) -> Iterator[Scenario]:
    """The gateway of the module docstring, after its mail was sent."""
    with (
        clamd_server(tmp_path / "clamd", daily_time=int(time.time()) - TWO_DAYS) as clamd,
        running_gateway(
            tmp_path / "gw",
            sections={
                "community": {"mode": "enforce"},
                "antivirus": {"clamd": clamd.unix, "on_virus": "reject"},
            },
        ) as gw,
    ):
        for i in range(ACCEPTED_TRUSTED):
            r = run(
                send(
                    gw.port, "127.0.0.1", "bob@remote.test", ["ann@example.test"], message(f"t{i}")
                )
            )
            assert r[-1].code == 250, r
        r = run(
            send(
                gw.port,
                "127.0.0.1",
                "bob@remote.test",
                ["ann@example.test"],
                message("virus", body=EICAR.decode() + "\r\n"),
            )
        )
        assert r[-1].code // 100 == 5 and "Virus found" in r[-1].text, r
        r = run(send(gw.port, "127.0.0.1", "bob@remote.test", ["nobody@example.test"]))
        assert r[2].code == 550, r
        for source in ("127.0.0.2", "127.0.0.3"):
            r = run(send(gw.port, source, "carl@remote.test", ["ann@example.test"]))
            assert r[2].code == 451, r
        gw.advance(3)
        r = run(send(gw.port, "127.0.0.2", "carl@remote.test", ["ann@example.test"], message("r")))
        assert r[-1].code == 250, r
        yield Scenario(gw, clamd, scrape(gw.web_port))


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    with exercised_gateway(tmp_path_factory.mktemp("prom")) as s:
        yield s


@pytest.fixture(scope="module")
def prom(scenario: Scenario, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    target = f"127.0.0.1:{scenario.gw.web_port}"
    with prometheus_server(tmp_path_factory.mktemp("prometheus"), [target], rules=[ALERTS]) as p:
        yield p


def _one(values: list[float]) -> float:
    assert len(values) == 1, values
    return values[0]


def test_prometheus_sees_the_mail_that_was_sent(prom: Prometheus) -> None:
    accepted = ACCEPTED_TRUSTED + 1  # and the outside retry
    got = prom.wait('kithmail_smtp_messages_total{result="accepted"}', lambda v: v == [accepted])
    assert got == [accepted]
    assert _one(prom.values('kithmail_smtp_messages_total{result="rejected"}')) == 1
    assert _one(prom.values('sum(kithmail_smtp_replies_total{command="RCPT", code="550"})')) == 1
    assert _one(prom.values('sum(kithmail_smtp_replies_total{command="RCPT", class="4xx"})')) == 2
    assert (
        _one(
            prom.values('sum(kithmail_verdicts_total{layer="recon", action="defer", shadow="no"})')
        )
        == 2
    )
    assert (
        _one(prom.values('sum(kithmail_verdicts_total{layer="antivirus", action="reject"})')) == 1
    )
    assert _one(prom.values('kithmail_antivirus_scans_total{result="clean"}')) == accepted
    assert _one(prom.values('kithmail_antivirus_scans_total{result="virus"}')) == 1
    # Every accepted message was held by layer 5; nothing waits for delivery.
    assert _one(prom.values('kithmail_quarantine_messages{layer="community"}')) == accepted
    assert _one(prom.values("kithmail_queue_messages")) == 0
    assert (
        _one(prom.values('kithmail_sav_challenges_suppressed_total{reason="sav.unauthenticated"}'))
        == accepted
    )
    # The retry's SPF check asked for TXT and got no answer.
    failed = prom.values('sum(kithmail_dns_queries_total{type="TXT", result=~"timeout|failure"})')
    assert _one(failed) >= 1
    assert prom.values('kithmail_dns_queries_total{type="TXT", result="answer"}') == []
    # Two new outside sources (and the trusted one is never a Recon row).
    assert _one(prom.values('kithmail_core_rows{table="recon"}')) == 2
    age = _one(prom.values("kithmail_antivirus_signatures_age_seconds"))
    assert TWO_DAYS <= age < TWO_DAYS + 3600
    assert _one(prom.values("kithmail_spool_filesystem_avail_bytes > 0")) > 0
    assert _one(prom.values("process_resident_memory_bytes")) > 1 << 20


def test_the_alert_rules_load_and_evaluate_and_none_fires(prom: Prometheus) -> None:
    def rules() -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{prom.url}/api/v1/rules", timeout=5) as r:
            groups = json.loads(r.read())["data"]["groups"]
        return [rule for g in groups for rule in g["rules"]]

    def evaluated(got: list[dict[str, Any]]) -> bool:
        return bool(got) and all(r.get("health") != "unknown" for r in got)

    deadline = time.monotonic() + 30
    got = rules()
    while time.monotonic() < deadline and not evaluated(got):
        time.sleep(0.5)
        got = rules()
    assert len(got) == 10
    assert {r["health"] for r in got} == {"ok"}, [(r["name"], r.get("lastError")) for r in got]
    # The gateway is up, its queue empty, its disk not full: nothing pending or firing.
    assert [r["name"] for r in got if r.get("state") != "inactive"] == []


def _dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])]


def test_every_dashboard_query_runs_on_real_data(prom: Prometheus, scenario: Scenario) -> None:
    # rate() needs two samples in its window.
    prom.wait("count_over_time(kithmail_smtp_sessions[1m])", lambda v: len(v) == 1 and v[0] >= 3)
    empty = []
    for expr in _dashboard_exprs():
        q = (
            expr.replace("$job", "kithmail")
            .replace("$instance", ".*")
            .replace("$__rate_interval", "1m")
        )
        if not prom.query(q):  # the query itself failing raises in query()
            empty.append(expr)
    # Series that have no events in this scenario (no SAV sent, no expiry,
    # no policy request, no delivery, no Recon delay observed) may be empty;
    # what carries the mail that was sent may not.
    for must in ("kithmail_smtp_messages_total", "kithmail_verdicts_total", "kithmail_core_rows"):
        assert not [e for e in empty if re.search(must + r"\b", e)], empty
