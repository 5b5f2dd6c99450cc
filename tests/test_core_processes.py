"""Several processes on one environment, and a writer killed mid-way.

docs/core.md: several processes may open the environment at once (the kith
CLI while the server runs); stale reader slots of a killed process are
cleared at open; a crash forgets at most one commit window of Recon writes.
Each other process here is a fresh interpreter (sys.executable), never a fork.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import kithmail

OpenCore = Callable[..., kithmail.Core]
RunPython = Callable[..., "subprocess.CompletedProcess[str]"]

MAP_SIZE = 256 << 20

OPEN = f"""
import json, sys
import kithmail
core = kithmail.Core(sys.argv[1], map_size={MAP_SIZE}, min_delay=5, retry_window=50,
                     pass_ttl=200)
"""


def nets(strs: list[str]) -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return {ipaddress.ip_network(s) for s in strs}


def test_we_see_what_another_process_writes(
    open_core: OpenCore, core_path: Path, run_python: RunPython
) -> None:
    core = open_core()
    core.community.add("ann@example.test", "@example.org")  # the table exists before
    assert core.recon.check("198.51.100.7", 0).status == "new"
    core.reputation.load("local", "block", ["203.0.113.0/24"])
    assert core.reputation.lookup("192.0.2.1") is None  # any cache is warm now

    r = run_python(
        OPEN
        + """
core.recon.exempt_add("198.51.100.0/24")
core.community.add("ann@example.test", "bob@example.com", "allow", "outbound", 42)
core.reputation.load("feed", "block", ["192.0.2.0/24"], action="defer", score=3)
core.recon.check("2001:db8::1", 100)
core.recon.pending_add("example.com", "ann@example.test", 100)
core.flush()
core.close()
""",
        str(core_path),
    )
    assert r.returncode == 0, r.stderr

    assert nets(core.recon.exempt_list()) == nets(["198.51.100.0/24"])
    assert core.recon.check("198.51.100.7", 1).status == "exempt"
    got = core.community.member("ann@example.test", "Bob@Example.com")
    assert (got.status, got.entry, got.source) == ("allowed", "bob@example.com", "outbound")
    assert core.community.count("ann@example.test") == 2
    m = core.reputation.lookup("192.0.2.1")
    assert m is not None
    assert (m.list, m.action, m.score, m.prefix) == ("feed", "defer", 3, "192.0.2.0/24")
    assert sorted(rl.name for rl in core.reputation.lists()) == ["feed", "local"]
    r2 = core.recon.check("2001:db8::1", 105)
    assert (r2.status, r2.first_seen) == ("passed", 100)
    assert core.recon.pending_get("example.com", "ann@example.test", 110) == 100


def test_another_process_sees_what_we_write(
    open_core: OpenCore, core_path: Path, run_python: RunPython
) -> None:
    core = open_core()
    core.recon.exempt_add("2001:db8:e::/48")
    core.community.add("ann@example.test", "@Bücher.example", "block", "manual", 7)
    core.reputation.load("partners", "allow", ["192.0.2.0/24"], action="accept")
    core.recon.check("192.0.2.1", 1000)
    core.reputation.record("192.0.2.1", "spam", 1000, n=2)
    core.flush()

    r = run_python(
        OPEN
        + """
m = core.community.member("ann@example.test", "x@xn--bcher-kva.example")
rep = core.reputation.lookup("192.0.2.9")
rc = core.recon.check("192.0.2.1", 1006)
print(json.dumps({
    "exempt": core.recon.check("2001:db8:e:1::1", 1006).status,
    "member": [m.status, m.entry, m.source],
    "rep": [rep.kind, rep.list, rep.prefix] if rep else None,
    "recon": [rc.status, rc.first_seen],
    "counters": core.reputation.counters("192.0.2.1"),
}))
core.close()
""",
        str(core_path),
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "exempt": "exempt",
        "member": ["blocked", "@xn--bcher-kva.example", "manual"],
        "rep": ["allow", "partners", "192.0.2.0/24"],
        "recon": ["passed", 1000],
        "counters": {"spam": [2, 2]},
    }
    # The other process's pass is ours too.
    assert core.recon.check("192.0.2.1", 1010).status == "known"


def test_two_writers_at_once(open_core: OpenCore, core_path: Path) -> None:
    core = open_core()
    writer = (
        OPEN
        + """
base = int(sys.argv[2])
for i in range(0, 3000, 100):
    core.recon.check_many([f"10.{base}.{(i + j) // 256}.{(i + j) % 256}" for j in range(100)], 7)
    core.community.add(f"u{base}@example.test", f"s{i}@example.com")
core.flush()
core.close()
"""
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", writer, str(core_path), str(b)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for b in (1, 2)
    ]
    core.recon.check_many([f"10.3.0.{i}" for i in range(100)], 7)
    core.flush()
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert len(core.recon) == 6100
    assert core.community.count("u1@example.test") == 30
    assert core.community.count("u2@example.test") == 30
    assert core.recon.check("10.2.11.183", 12).status == "passed"


KILLED_WRITER = (
    OPEN.replace("pass_ttl=200", "pass_ttl=200, commit_window_ms=1")
    + """
# 1000 sources, flushed: these must survive the kill.
core.recon.check_many([f"10.0.{i // 256}.{i % 256}" for i in range(1000)], 1000)
core.community.add("ann@example.test", "bob@example.com")
core.flush()
print("flushed", flush=True)
i = 0
start = 0x0B000000 + int(sys.argv[2]) * 0x00800000
while True:
    base = start + i * 200
    core.recon.check_many([f"{(base + j) >> 24}.{((base + j) >> 16) & 255}."
                           f"{((base + j) >> 8) & 255}.{(base + j) & 255}" for j in range(200)],
                          1000 + i % 40)
    core.reputation.record(f"192.0.2.{i % 256}", "spam", 1000)
    i += 1
"""
)


def test_a_killed_writer_leaves_a_working_environment(open_core: OpenCore, core_path: Path) -> None:
    for round_ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", KILLED_WRITER, str(core_path), str(round_)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line == "flushed\n", child.stderr.read() if child.stderr else ""
            # Wait (bounded) until the child's group commits are landing, then
            # kill it in the middle of them.
            watcher = open_core()
            start = len(watcher.recon)
            deadline = time.monotonic() + 30
            while len(watcher.recon) < start + 2000:
                assert child.poll() is None, child.stderr.read() if child.stderr else ""
                assert time.monotonic() < deadline, "the child's commits never landed"
                time.sleep(0.01)
            watcher.close()
            del watcher
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
            if child.stdout:
                child.stdout.close()
            if child.stderr:
                child.stderr.close()
        assert child.returncode == -signal.SIGKILL

        core = open_core()
        assert len(core.recon) >= 1000
        for i in (0, 1, 500, 999):
            r = core.recon.check(f"10.0.{i // 256}.{i % 256}", 1010)
            assert (r.status, r.first_seen) in {("passed", 1000), ("known", 1000)}
        # Writes work: the writer lock was not left held.
        assert core.recon.check(f"172.16.0.{round_}", 2000).status == "new"
        core.flush()
        assert core.community.add("ann@example.test", f"x{round_}@example.com") is True
        assert core.community.member("ann@example.test", "bob@example.com").status == "allowed"
        core.reputation.load("after", "block", ["198.51.100.0/24"])
        assert core.reputation.lookup("198.51.100.1") is not None
        core.close()
        del core
