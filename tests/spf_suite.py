"""The RFC 7208 test suite (tests/data/rfc7208-tests.yml) as cases and DNS zones.

The suite is a YAML stream of scenarios; each has `tests` (helo, host,
mailfrom, the result or results allowed, sometimes an explanation) and
`zonedata`, the DNS each scenario sees. Scenarios reuse names with other
records, so each is served by its own DNS server; `zones(scenario)` turns
its zone data into Knot zone files, following the suite's conventions:

- an `SPF:` record is served as type SPF, and also as TXT when the name
  lists no `TXT:` of its own; `TXT: NONE` means no TXT at all;
- strings are UTF-8 on the wire, every byte written as the zone file
  escape it needs (NUL, CR, LF and bytes over 127 included);
- `TIMEOUT` marks a name whose server does not answer for the types the
  name has no records of. A server cannot fail one type and answer
  another, so a TIMEOUT name with no TXT records (pyspf asks TXT for a
  policy, and none of these names has other records) becomes a zone that
  fails to load: every query for it is a real SERVFAIL, which RFC 7208 §4.4
  treats as a timeout is treated (temperror). A TIMEOUT name with TXT
  records is served as it is. Names of the scenario below a failing name
  become zones of their own, so that they stay answered.

The YAML is read with PyYAML's safe loader (pinned in the test extras).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Case:
    """One test of the suite."""

    id: str
    scenario: int
    spec: str
    helo: str
    host: str
    mailfrom: str
    results: tuple[str, ...]  # the first is the one preferred
    explanation: str | None = None
    strict: int = 1


@dataclass
class Scenario:
    index: int
    description: str
    zonedata: dict[str, list[Any]]
    cases: list[Case] = field(default_factory=list)


def load(path: Path) -> list[Scenario]:
    """Every scenario of the suite, in file order."""
    with path.open("rb") as f:
        docs = list(yaml.safe_load_all(f))
    scenarios = []
    for i, doc in enumerate(docs):
        s = Scenario(i, doc["description"], doc.get("zonedata") or {})
        for name, t in doc["tests"].items():
            res = t["result"]
            s.cases.append(
                Case(
                    id=name,
                    scenario=i,
                    spec=str(t.get("spec", "")),
                    helo=t["helo"],
                    host=t["host"],
                    mailfrom=t["mailfrom"],
                    results=tuple(res) if isinstance(res, list) else (res,),
                    explanation=t.get("explanation"),
                    strict=int(t.get("strict", 1)),
                )
            )
        scenarios.append(s)
    return scenarios


# ------------------------------------------------------------------ zone files


def _escape(data: bytes, keep: bytes) -> str:
    """Zone file text for `data`: bytes in `keep` as they are, the rest as \\DDD."""
    return "".join(chr(b) if b in keep else f"\\{b:03d}" for b in data)


_LABEL_SAFE = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
_STRING_SAFE = bytes(b for b in range(0x20, 0x7F) if b not in b'"\\')


def owner(name: str) -> str:
    """An absolute owner name, every byte outside letters, digits, - and _ escaped."""
    labels = name.rstrip(".").split(".")
    return ".".join(_escape(label.encode(), _LABEL_SAFE) for label in labels) + "."


def _strings(value: Any) -> str:
    strings = [value] if isinstance(value, str) else list(value)
    if not strings:
        strings = [""]  # a TXT record holds at least one string
    return " ".join('"' + _escape(s.encode(), _STRING_SAFE) + '"' for s in strings)


def _rdata(rtype: str, value: Any) -> str:
    if rtype in ("TXT", "SPF"):
        return _strings(value)
    if rtype == "MX":
        pref, host = value
        return f"{int(pref)} {owner(host) if host else '.'}"
    if rtype in ("PTR", "CNAME"):
        return owner(value)
    if rtype in ("A", "AAAA"):
        return str(value)
    raise ValueError(f"record type {rtype} is not in the suite's conventions")


def records(zonedata: dict[str, list[Any]]) -> tuple[dict[str, list[str]], set[str]]:
    """(name -> zone file lines, the TIMEOUT names) for one scenario."""
    lines: dict[str, list[str]] = {}
    timeouts: set[str] = set()
    for name, entries in zonedata.items():
        key = name.lower().rstrip(".")
        out = lines.setdefault(key, [])
        has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
        for entry in entries:
            if entry == "TIMEOUT":
                timeouts.add(key)
                continue
            for rtype, value in entry.items():
                if value == "NONE":
                    continue  # "no records of this type", and no TXT made from SPF
                out.append(f"{owner(name)} 60 {rtype} {_rdata(rtype, value)}")
                if rtype == "SPF" and not has_txt:
                    out.append(f"{owner(name)} 60 TXT {_rdata(rtype, value)}")
    return lines, timeouts


def zones(scenario: Scenario) -> dict[str, str | None]:
    """Knot zones serving one scenario: name -> zone file text, None for a failing one."""
    lines, timeouts = records(scenario.zonedata)
    failing = {n for n in timeouts if not any(" TXT " in line for line in lines.get(n, []))}

    def under_failing(name: str) -> bool:
        return any(name == f or name.endswith("." + f) for f in failing)

    out: dict[str, str | None] = {".": ""}
    for name in sorted(failing):
        out[owner(name)] = None
    for name, recs in lines.items():
        if not recs or name in failing:
            continue
        if under_failing(name):
            out[owner(name)] = "\n".join(recs) + "\n"
        else:
            out["."] = str(out["."]) + "\n".join(recs) + "\n"
    return out
