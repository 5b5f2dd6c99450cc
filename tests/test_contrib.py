"""What contrib/ ships works as shipped: alert rules, their tests, the dashboard, the unit, the example.

- `promtool check rules` and `promtool test rules` (Debian's prometheus) on
  contrib/prometheus/;
- the Grafana dashboard parses, and every series its queries and the alert
  rules name is one that a real `kith serve` exports (a real scrape of the
  scenario in test_prometheus.py);
- `systemd-analyze verify` accepts contrib/systemd/kithmail.service, with
  no warning, once its ExecStart points at this checkout's `kith`;
- contrib/kithmail.toml.example is `kithmail.config_example.example()`,
  holds every key, and means exactly the embedded defaults.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_server import PROMTOOL, Samples
from pydantic import BaseModel
from test_prometheus import exercised_gateway

from kithmail import config
from kithmail.config_example import example

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
PROM = CONTRIB / "prometheus"
KITH = Path(sys.executable).parent / "kith"


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


def test_promtool_checks_the_alert_rules() -> None:
    r = _run(PROMTOOL, "check", "rules", str(PROM / "alerts.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 10 rules found" in r.stdout


def test_promtool_runs_the_alert_unit_tests() -> None:
    r = _run(PROMTOOL, "test", "rules", "alerts_test.yml", cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


# ---------------------------------------------------------------- names against a real scrape

_SERIES = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{")


def _exposed_names(page: Samples) -> set[str]:
    """Every series name a family can show, even one that has no sample yet."""
    out = page.names()
    for name, kind in page.families.items():
        if kind == "counter":
            out |= {name + "_total"}
        elif kind == "histogram":
            out |= {name + "_bucket", name + "_sum", name + "_count"}
        else:
            out.add(name)
    return out


def _dashboard() -> dict[str, object]:
    d: dict[str, object] = json.loads((CONTRIB / "grafana" / "kithmail.json").read_text())
    return d


def _alert_exprs() -> list[str]:
    """Each rule's `expr:`, one line or a `|` block (the two forms alerts.yml uses)."""
    out: list[str] = []
    lines = (PROM / "alerts.yml").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr: (.*)$", line)
        if not m:
            continue
        if m[2] != "|":
            out.append(m[2])
            continue
        block = []
        for more in lines[i + 1 :]:
            if more.strip() and len(more) - len(more.lstrip()) <= len(m[1]):
                break
            block.append(more.strip())
        out.append(" ".join(block).strip())
    assert len(out) == 10
    return out


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    with exercised_gateway(tmp_path_factory.mktemp("contrib")) as s:
        yield _exposed_names(s.page)


def test_the_dashboard_is_well_formed() -> None:
    d = _dashboard()
    panels = d["panels"]
    assert isinstance(panels, list) and len(panels) > 20
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for t in p.get("targets", []):
            assert t["expr"] and t["refId"], p["title"]
    names = {v["name"] for v in d["templating"]["list"]}  # type: ignore[index]
    assert names == {"datasource", "job", "instance"}


def test_dashboard_and_alerts_name_only_exported_series(exposed: set[str]) -> None:
    panels = _dashboard()["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]  # type: ignore[union-attr]
    exprs += _alert_exprs()
    unknown = {}
    for e in exprs:
        names = _SERIES.findall(e)
        assert names, f"no series named in {e!r}"
        for n in names:
            if n != "up" and n not in exposed:
                unknown[n] = e
    assert unknown == {}
    # And the dashboard covers what the issue asks to be seen.
    joined = "\n".join(exprs)
    for family in (
        "kithmail_verdicts_total",
        "kithmail_smtp_replies_total",
        "kithmail_smtp_session_seconds_bucket",
        "kithmail_queue_messages",
        "kithmail_queue_oldest_seconds",
        "kithmail_delivery_attempts_total",
        "kithmail_quarantine_messages",
        "kithmail_quarantine_expired_total",
        "kithmail_sav_challenges_total",
        "kithmail_sav_challenges_suppressed_total",
        "kithmail_dns_queries_total",
        "kithmail_dns_query_seconds_bucket",
        "kithmail_antivirus_seconds_bucket",
        "kithmail_antivirus_scans_total",
        "kithmail_core_rows",
        "kithmail_core_map_used_bytes",
        "process_resident_memory_bytes",
    ):
        assert family + "{" in joined, family


# ---------------------------------------------------------------- systemd


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    text = (CONTRIB / "systemd" / "kithmail.service").read_text()
    assert "/opt/kithmail/bin/kith serve -c /etc/kithmail/kithmail.toml" in text
    for option in ("User=kithmail", "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert option in text.splitlines(), option
    unit = tmp_path / "kithmail.service"
    unit.write_text(text.replace("/opt/kithmail/bin/kith", str(KITH)))
    r = _run("systemd-analyze", "verify", "--man=no", str(unit))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.strip() == "", r.stderr  # unknown keys are only warned about


# ---------------------------------------------------------------- the config example


def _keys(model: type[BaseModel], prefix: str) -> set[str]:
    out = set()
    for name, f in model.model_fields.items():
        if f.exclude:
            continue
        key = f.alias or name
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _keys(ann, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


def test_the_config_example_is_generated_and_complete() -> None:
    path = CONTRIB / "kithmail.toml.example"
    assert path.read_text() == example(), (
        "contrib/kithmail.toml.example is stale: run "
        "`.venv/bin/python -m kithmail.config_example > contrib/kithmail.toml.example`"
    )
    # Every key is there, set or (when its default is unset) commented out.
    text = path.read_text()
    data = tomllib.loads(text)
    present: set[str] = set()

    def walk(d: dict[str, object], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and prefix + k not in ("",):
                walk(v, f"{prefix}{k}.") if _is_section(prefix + k) else present.add(prefix + k)
            else:
                present.add(prefix + k)

    walk(data, "")
    section = ""
    for line in text.splitlines():
        if m := re.match(r"^\[([a-z_.]+)\]$", line):
            section = m[1]
        elif m := re.match(r"^# ([a-z_0-9]+) =   \(unset\)$", line):
            present.add(f"{section}.{m[1]}")
    assert present == _keys(config.Settings, "")
    # Loaded, it is the embedded default.
    assert config.load(path).model_dump() == config.Settings().model_dump()


def _is_section(dotted: str) -> bool:
    model: type[BaseModel] = config.Settings
    for part in dotted.split("."):
        f = model.model_fields.get(part)
        if f is None or not (
            isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
        ):
            return False
        model = f.annotation
    return True
