"""A real authoritative DNS server for tests: Debian's Knot DNS on loopback.

dnsmasq (tests/dns_server.py) takes its records on the command line, which
cannot carry every byte a TXT record may hold (NUL, quotes, commas, bytes
over 127), CNAME chains and loops, PTR names or a name whose server fails.
Knot reads real zone files, so a test can serve exactly what it means to.

`knot_servers(tmp_dir)` yields `start(zones)`: `zones` maps a zone name to
the text of its zone file, or to None for a zone that is configured but
fails to load — Knot then answers SERVFAIL for every name in it, a real
server failure. Each server listens on 127.0.0.1 at a free port; `start`
returns once every loaded zone answers its SOA (a readiness query, never a
sleep), and every server is stopped on exit.

`make test` installs knot (DEB_PACKAGES); run by hand, `apt-get install -y
--no-install-recommends knot`.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
from dns_server import _free_port

KNOTD = "/usr/sbin/knotd"
START_TIMEOUT = 10.0

# The head of every zone: Knot wants an SOA at each apex.
SOA = "@ 3600 SOA ns.invalid. hostmaster.invalid. 1 3600 600 86400 60\n@ 3600 NS ns.invalid.\n"


@dataclass
class Knot:
    """One running knotd; `address` is "127.0.0.1:PORT" for `[dns] nameservers`."""

    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


StartKnot = Callable[[Mapping[str, str | None]], Knot]


def _config(base: Path, port: int, zones: Mapping[str, str | None]) -> str:
    lines = [
        "server:",
        f'    rundir: "{base}"',
        f"    listen: 127.0.0.1@{port}",
        "    udp-workers: 1",
        "    tcp-workers: 1",
        "    background-workers: 1",
        "log:",
        "  - target: stderr",
        "    any: warning",
        "database:",
        f'    storage: "{base}"',
        "template:",
        "  - id: default",
        f'    storage: "{base}"',
        "    zonefile-sync: -1",  # never write zone files back
        "    journal-content: none",
        # Test zones are odd on purpose (a CNAME loop, names with ':' or spaces).
        "    semantic-checks: off",
        "zone:",
    ]
    for i, name in enumerate(zones):
        # A zone with no file is one Knot configures and fails to load.
        lines += [f'  - domain: "{name}"', f'    file: "zone{i}.zone"']
    return "\n".join(lines) + "\n"


def _ready(proc: subprocess.Popen[bytes], port: int, loaded: list[str]) -> bool:
    """Ask each loaded zone for its SOA until all answer; False if knotd died."""
    deadline = time.monotonic() + START_TIMEOUT
    pending = list(loaded)
    while pending and time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            r = dns.query.udp(
                dns.message.make_query(pending[0], "SOA"), "127.0.0.1", port=port, timeout=0.05
            )
        except dns.exception.Timeout:
            continue
        except OSError:  # not bound yet: pace on its exit instead
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.02)
            continue
        if r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA and r.answer:
            pending.pop(0)
        else:  # still loading: SERVFAIL until the zone is in
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.01)
    return not pending


@contextlib.contextmanager
def knot_servers(tmp_dir: Path) -> Iterator[StartKnot]:
    """Yield start(zones) -> Knot; every server started is stopped at the end."""
    if shutil.which(KNOTD) is None:
        raise RuntimeError("knot is not installed: apt-get install -y --no-install-recommends knot")
    started: list[Knot] = []

    def start(zones: Mapping[str, str | None]) -> Knot:
        for attempt in range(3):
            base = tmp_dir / f"knot{len(started)}-{attempt}"
            base.mkdir()
            for i, text in enumerate(zones.values()):
                if text is not None:
                    (base / f"zone{i}.zone").write_text(SOA + text, encoding="ascii")
            port = _free_port()
            conf = base / "knot.conf"
            conf.write_text(_config(base, port, zones))
            log = base / "knotd.log"
            with log.open("wb") as err:
                proc = subprocess.Popen(
                    [KNOTD, "-c", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
            loaded = [name for name, text in zones.items() if text is not None]
            if _ready(proc, port, loaded):
                server = Knot(port, log, proc)
                started.append(server)
                return server
            proc.kill()
            proc.wait()
            if attempt == 2:  # a port taken between probe and bind: try another
                raise RuntimeError(f"knotd did not serve its zones: {log.read_text()}")
        raise AssertionError("unreachable")

    try:
        yield start
    finally:
        for s in started:
            s.stop()
