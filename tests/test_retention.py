"""Nothing personal kept for ever (docs/retention.md), seen from outside a real `kith serve`.

Learned reputation counters go `[reputation] learned_ttl` after a source's
last counted event; audit rows go `[web] audit_retention` after the action;
a removed user's community entries go with the account. The server sweeps
at start and then every minute: a restart after moving its test clock shows
a sweep without waiting for one.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from gateway import Gateway, make_gateway, message, run, running_gateway, send
from prometheus_client.parser import text_string_to_metric_families

from kithmail.db import Database

DAY = 86400
LEARNED = {
    # Inside the exempt /26, so Recon never defers these sources.
    "recon": {"exempt_networks": ["127.0.0.0/26"]},
    "reputation": {"learned_threshold": 3, "learned_action": "defer", "learned_ttl": "7d"},
}


def _make_learned_bad(gw: Gateway, ip: str) -> None:
    """Three RCPTs to users who do not exist: a dictionary attack's trace."""
    for name in ("nobody", "noone", "ghost"):
        r = run(send(gw.port, ip, "spammer@remote.test", [f"{name}@example.test"]))[2]
        assert (r.code, r.status) == (550, "5.1.1"), r


def _rcpt(gw: Gateway, ip: str, subject: str) -> tuple[int, str]:
    replies = run(send(gw.port, ip, "carl@remote.test", ["ann@example.test"], message(subject)))
    return replies[2].code, replies[2].status


def _deleted(gw: Gateway, kind: str) -> float:
    """`kithmail_retention_deleted_total{kind=...}` from the server's /metrics."""
    url = f"http://127.0.0.1:{gw.web_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kithmail_retention_deleted_total" and sample.labels == {
                "kind": kind
            }:
                return float(sample.value)
    raise AssertionError(f"no kithmail_retention_deleted_total{{kind={kind!r}}} in /metrics")


def _restart_and_wait_for(gw: Gateway, line: str) -> None:
    """Restart, then wait for the start's sweep to log `line`."""
    before = gw.log_text().count(line)  # counted first: the new process may say it at once
    gw.restart()
    gw.wait_for(line, lambda: gw.log_text().count(line) > before)


def test_a_learned_deferral_is_forgotten_after_learned_ttl(tmp_path: Path) -> None:
    old, young = "127.0.0.40", "127.0.0.41"  # one /24: its network counter outlives `old`'s
    with running_gateway(tmp_path / "gw", sections=LEARNED) as gw:
        _make_learned_bad(gw, old)
        assert _rcpt(gw, old, "first") == (451, "4.7.1")
        assert "reputation.learned" in gw.log_text()
        gw.advance(5 * DAY)
        _make_learned_bad(gw, young)
        assert _rcpt(gw, young, "first") == (451, "4.7.1")
        # `old`'s last counted event is now 7 days and a minute old; `young`'s 2 days.
        gw.advance(2 * DAY + 60)
        _restart_and_wait_for(gw, "reputation sweep:")
        # `old`'s address counter: the network's is younger (`young` is in its /24).
        assert _deleted(gw, "learned") == 1
        assert _rcpt(gw, old, "after the ttl") == (250, "2.1.5")
        got = gw.wait_for("the delivery", lambda: gw.messages("ann@example.test"))
        assert [m for m in got if b"Subject: after the ttl" in m]
        assert _rcpt(gw, young, "still learned") == (451, "4.7.1")


def test_audit_rows_go_after_audit_retention(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path / "gw", sections={"web": {"audit_retention": "30d"}})
    path = gw.data_dir / "kithmail.db"
    now = time.time()
    for age, target in ((31 * DAY, "old@example.test"), (29 * DAY, "young@example.test")):
        d = Database.open(path, clock=lambda age=age: now - age)
        try:
            d.audit("admin@example.test", "quarantine.release", target=target)
        finally:
            d.close()
    try:
        gw.start()
        gw.wait_for("the audit sweep", lambda: "audit sweep: 1 rows deleted" in gw.log_text())
        d = Database.open(path)
        try:
            rows = d.read(
                "SELECT target FROM audit_log WHERE action = 'quarantine.release' ORDER BY at"
            )
        finally:
            d.close()
        assert rows == [("young@example.test",)]
        assert _deleted(gw, "audit") == 1
    finally:
        try:
            gw.stop()
        finally:
            gw.kill()


def test_a_removed_users_community_goes_with_the_account(tmp_path: Path) -> None:
    with running_gateway(tmp_path / "gw") as gw:
        for entry in ("carl@remote.test", "@partner.test", "list:news.remote.test"):
            gw.kith("community", "add", "ann@example.test", entry)
        gw.kith("community", "add", "ann@example.test", "spam@bad.test", "--block")
        gw.kith("community", "add", "bob@example.test", "carl@remote.test")
        listed = json.loads(gw.kith("community", "list", "ann@example.test", "--json").stdout)
        assert len(listed) == 4
        removed = gw.kith("user", "remove", "ann@example.test")
        gw.kith("user", "add", "ann@example.test")
        r = gw.kith("community", "list", "ann@example.test")
        assert (r.stdout, r.stderr) == ("", "no community entries for ann@example.test\n")
        assert removed.stdout == "removed user ann@example.test\n"
        assert "4 community entries" in removed.stderr
        bob = json.loads(gw.kith("community", "list", "bob@example.test", "--json").stdout)
        assert [e["entry"] for e in bob] == ["carl@remote.test"]
        d = Database.open(gw.data_dir / "kithmail.db")
        try:
            audit = d.read("SELECT action, target FROM audit_log WHERE action = 'user.remove'")
        finally:
            d.close()
        assert audit == [("user.remove", "ann@example.test")]
