"""bench/soak.py end to end, short: the mixed load loses nothing and exercises every class.

A 12-second soak against the debug build in .venv (`kith serve` with two
workers, a real dnsmasq, the recording downstream killed and started again,
SIGHUP when this kithmail reloads on it) and the bare aiosmtpd baseline.
Only what a user of the benchmark relies on is asserted: the JSON is
written with its fields, every message answered 250 is delivered or held,
duplicates come only from the kill, every class of the load ran, the flood
and the listed sources got nothing through. Speed and memory figures are
reported by the benchmark and never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "bench" / "soak.py"
CLASSES = ("flood", "spam", "member_known", "member_new", "stranger_known", "stranger_new")


def test_short_soak_loses_nothing_and_exercises_every_class(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--minutes",
            "0.2",
            "--users",
            "8",
            "--baseline",
            "aiosmtpd",
            "--baseline-seconds",
            "3",
            "--profile",
            "debug",
            "--dir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.exists(), f"no JSON written (exit {done.returncode}):\n{done.stderr[-3000:]}"
    rep = json.loads(out.read_text())
    assert rep["errors"] == [], rep["errors"]
    assert done.returncode == 0, done.stderr[-3000:]
    for key in ("machine", "build_profile", "dataset", "rates_per_s", "classes", "overall"):
        assert key in rep, key
    assert rep["machine"]["cores"] and rep["dataset"]["users"] == 8

    # Zero lost: every 250 is at the downstream or in a quarantine.
    d = rep["delivery"]
    assert d["accepted"] > 0
    assert d["lost"] == 0 and d["lost_examples"] == []
    assert d["delivered_distinct"] + d["held"] == d["accepted"]
    assert d["duplicates_other"] == 0
    assert d["members_held"] == 0  # a member's mail is delivered, never held
    # Strangers were held and challenged; those who replied had theirs released.
    assert (
        d["by_class"]["stranger_known"].get("held", 0)
        + d["by_class"]["stranger_new"].get("held", 0)
        > 0
    )
    assert d["challenges"] > 0 and d["strangers_released"] > 0
    assert d["sav_replies_delivered"] == 0  # a SAV reply is consumed, never delivered
    # Mail accepted while the downstream was down was queued and delivered after its return.
    assert d["outage"]["delivered_accepted_while_down"] > 0
    assert (
        d["outage"]["of_them_delivered_after_restart"]
        == d["outage"]["delivered_accepted_while_down"]
    )

    # Every class ran; nothing from the flood or the listed sources got a 250.
    classes = rep["classes"]
    for name in (*CLASSES, "sav_reply"):
        assert classes[name]["connections"] > 0, name
    assert set(classes["flood"]["answers"]) == {"451 4.7.1"}
    assert classes["flood"]["answers"]["451 4.7.1"] == classes["flood"]["connections"]
    assert not [k for k in classes["spam"]["answers"] if k.startswith("2")]
    assert any(k.startswith("5") for k in classes["spam"]["answers"])  # refused once past Recon
    assert classes["stranger_new"]["deferred_first"] > 0  # a new source is deferred, then retries
    assert classes["sav_reply"]["accepted"] > 0

    # The downstream was killed and came back; the figures the issue asks for are there.
    tl = rep["timeline"]
    assert tl["downstream_killed_at_s"] is not None
    assert tl["downstream_restarted_at_s"] > tl["downstream_killed_at_s"]
    if rep["sighup"]["sent"]:  # the same processes, still answering, after each reload
        assert len(rep["sighup"]["reloads"]) == 2
        for r in rep["sighup"]["reloads"]:
            assert r["alive"] and r["greets_after"], r
            assert r["pids_after"] == r["pids_before"], r
    mem = rep["memory"]
    assert mem["samples"] > 0 and "growth_second_half_pct" in mem and "pass" in mem
    assert {"p50_ms", "p99_ms"} <= set(rep["overall"]["transaction"])
    assert {"msgs_per_s", "conns_per_s"} <= set(rep["overall"])
    base = rep["baseline"]
    assert base["server"] == "aiosmtpd" and base["accepted"] > 0 and base["lost"] == 0
    assert rep["gateway"]["exit_status"] == 0
