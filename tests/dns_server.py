"""Real DNS servers for tests: Debian's dnsmasq on loopback, and a silent socket.

`dnsmasq_servers(tmp_path)` starts dnsmasq processes serving fixed records
given on its command line (no config file is read: `--conf-file=/dev/null`),
each on 127.0.0.1 at a free port, waits until each answers a query (never a
sleep), and stops them all on exit. Every query is logged (`--log-queries`
to a file in tmp_path), so a test can prove what was — and was not — asked.

`SilentServer` is a bound UDP socket on loopback that never replies: queries
sent to it time out, and it counts the datagrams it received.

`make test` installs dnsmasq (DEB_PACKAGES); run by hand, `apt-get install
-y --no-install-recommends dnsmasq`.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
from ports import free_port

DNSMASQ = "/usr/sbin/dnsmasq"
START_TIMEOUT = 5.0

_QUERY = re.compile(r"dnsmasq\[(\d+)\]: query\[(\w+)\] (\S+) from ")


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq binds both)."""
    return free_port(udp=True)


def _txt_string(s: str) -> str:
    # On the command line dnsmasq splits a TXT record's strings at commas
    # and keeps quotes as data.
    if "," in s or '"' in s:
        raise ValueError("a test TXT string holds no comma or quote")
    return s


@dataclass
class Dnsmasq:
    """One running dnsmasq; `address` is "127.0.0.1:PORT" for `[dns] nameservers`."""

    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def queries(self) -> list[tuple[str, str, int]]:
        """Every query it received so far: (type, name, serving pid).

        dnsmasq writes its log synchronously, so a query whose answer has
        arrived is already here. A TCP query is served by a forked child,
        so its pid differs from the main process's.
        """
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [(m[2], m[3], int(m[1])) for m in _QUERY.finditer(text)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


StartDnsmasq = Callable[..., Dnsmasq]


def _args(
    port: int,
    log: Path,
    zones: Iterable[str],
    a: Iterable[tuple[str, str]],
    aaaa: Iterable[tuple[str, str]],
    txt: Iterable[tuple[str, str | Sequence[str]]],
    mx: Iterable[tuple[str, str, int]],
) -> list[str]:
    args = [
        DNSMASQ,
        "-k",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--pid-file=",
        "--user=root",
        "--log-queries",
        f"--log-facility={log}",
    ]
    # Without --local an unknown name is REFUSED; with it, NXDOMAIN.
    args += [f"--local=/{z}/" for z in zones]
    args += [f"--host-record={name},{ip}" for name, ip in [*a, *aaaa]]
    for name, value in txt:
        # One string: dnsmasq splits it into 255-byte character-strings
        # itself; a sequence: exactly those strings, in that order.
        strings = [value] if isinstance(value, str) else list(value)
        args.append(f"--txt-record={name}," + ",".join(_txt_string(s) for s in strings))
    args += [f"--mx-host={d},{h},{p}" for d, h, p in mx]
    return args


def _wait_ready(proc: subprocess.Popen[bytes], port: int, zone: str) -> None:
    """Ask until dnsmasq answers; each try waits at most 50 ms for it."""
    deadline = time.monotonic() + START_TIMEOUT
    query = dns.message.make_query(f"ready.{zone}", "A")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            dns.query.udp(query, "127.0.0.1", port=port, timeout=0.05)
            return
        except dns.exception.Timeout:
            continue
        except OSError:  # ECONNREFUSED before it binds: pace on its exit instead
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.02)
    proc.kill()
    _, err = proc.communicate()
    raise RuntimeError(f"dnsmasq did not answer on port {port}: {err.decode(errors='replace')}")


@contextlib.contextmanager
def dnsmasq_servers(tmp_path: Path) -> Iterator[StartDnsmasq]:
    """Yield start(zones=..., a=..., aaaa=..., txt=..., mx=...) -> Dnsmasq."""
    if shutil.which(DNSMASQ) is None:
        raise RuntimeError(
            "dnsmasq is not installed: apt-get install -y --no-install-recommends dnsmasq"
        )
    started: list[Dnsmasq] = []

    def start(
        *,
        zones: Sequence[str] = ("example.test",),
        a: Iterable[tuple[str, str]] = (),
        aaaa: Iterable[tuple[str, str]] = (),
        txt: Iterable[tuple[str, str | Sequence[str]]] = (),
        mx: Iterable[tuple[str, str, int]] = (),
    ) -> Dnsmasq:
        a, aaaa, txt, mx = list(a), list(aaaa), list(txt), list(mx)
        for attempt in range(3):
            port = _free_port()
            log = tmp_path / f"dnsmasq-{len(started)}-{attempt}.log"
            proc = subprocess.Popen(
                _args(port, log, zones, a, aaaa, txt, mx),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                _wait_ready(proc, port, zones[0] if zones else "test")
            except RuntimeError:
                if attempt == 2:  # a port taken between probe and bind: try another
                    raise
                continue
            server = Dnsmasq(port, log, proc)
            started.append(server)
            return server
        raise AssertionError("unreachable")

    try:
        yield start
    finally:
        for s in started:
            s.stop()
            if s.proc.stderr is not None:
                s.proc.stderr.close()


@dataclass
class SilentServer:
    """A UDP socket on loopback that reads and never replies."""

    sock: socket.socket = field(
        default_factory=lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    )
    count: int = 0

    def __post_init__(self) -> None:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def received(self) -> int:
        """How many datagrams have arrived so far (the kernel keeps them queued)."""
        while True:
            try:
                self.sock.recv(65535)
            except BlockingIOError:
                return self.count
            self.count += 1

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def silent_server() -> Iterator[SilentServer]:
    s = SilentServer()
    try:
        yield s
    finally:
        s.close()
