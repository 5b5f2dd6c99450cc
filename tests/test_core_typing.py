"""The shipped stubs (python/kithmail/_core.pyi) type-check a real program.

A small program using Core, recon.check, reputation.lookup and
community.member must pass `mypy --strict`; a program misusing the results
must fail, which shows the stubs are in use rather than silently Any.
(stubtest against the built module is run by the Makefile.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

GOOD = """
from typing import assert_type

import kithmail
from kithmail._core import CommunityEntry, Membership, RepMatch, ReconResult


def decide(core: kithmail.Core, ip: str, sender: str) -> str:
    r = core.recon.check(ip, 1_700_000_000)
    assert_type(r, ReconResult)
    if r.status == "new" and not r.recorded:
        return "defer"
    delay: int = 1_700_000_000 - r.first_seen
    m = core.reputation.lookup(ip)
    assert_type(m, RepMatch | None)
    if m is not None and m.kind == "block":
        return f"{m.action} {m.list} {m.prefix} {m.score} {delay}"
    many = core.reputation.lookup_many([ip, b"\\xc0\\x00\\x02\\x01"])
    assert_type(many, list[RepMatch | None])
    who = core.community.member("ann@example.test", sender, None, "tenant:example.test")
    assert_type(who, Membership)
    whom = core.community.member_many([("ann@example.test", sender, None, None)])
    assert_type(whom, list[Membership])
    entries = core.community.list("ann@example.test")
    assert_type(entries, list[CommunityEntry])
    if who.status == "blocked" or whom[0].status == "blocked":
        return "discard"
    return who.scope or "unknown"


def main() -> None:
    core = kithmail.Core("/nonexistent/core", ipv4_prefix=24, commit_window_ms=50)
    try:
        print(decide(core, "192.0.2.1", "bob@example.com"))
        core.flush()
    except kithmail.CoreError as e:
        print(e)
    finally:
        core.close()
"""

BAD = """
import kithmail

core = kithmail.Core("/nonexistent/core")
status: int = core.recon.check("192.0.2.1", 0).status
prefix: str = core.reputation.lookup("192.0.2.1").prefix
core.community.member("ann@example.test", "bob@example.com", org=5)
"""


def mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    prog = tmp_path / "prog.py"
    prog.write_text(source)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            str(prog),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=110,
        check=False,
    )


def test_stubs_type_check_a_program(tmp_path: Path) -> None:
    r = mypy(tmp_path, GOOD)
    assert r.returncode == 0, r.stdout + r.stderr


def test_stubs_catch_misuse(tmp_path: Path) -> None:
    r = mypy(tmp_path, BAD)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert 'expression has type "Literal[' in out  # status is a Literal, not an int
    assert '"RepMatch | None"' in out or "union-attr" in out
    assert 'Argument "org"' in out
