"""The peers bench/layers.py measures against: dnsmasq and clamd on loopback.

- `start_dnsmasq`: Debian's dnsmasq answering A, MX and TXT records given on
  its command line (no config file), NXDOMAIN for anything else in its
  zones, nothing forwarded. `dns_queries` reads its own count of queries
  answered (SIGUSR1 makes it log its statistics), so queries per message
  are counted without logging each query.
- `start_clamd`: Debian's clamd in the foreground with a config and a
  signature database written here (the EICAR test string by content; no
  official databases, no freshclam, no network), on a unix socket.
- `clamd_command`: one command to clamd (VERSION, zINSTREAM) over a
  plain blocking socket, the floor of the anti-virus layer.

Every start waits for the service to answer (a DNS answer, clamd's PONG),
polling, never sleeping a fixed time, and fails with the tail of its log.
`taskset -c CPUS` goes in front of the argv when `cpus` is given.

Trusts: the binaries at their Debian paths.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import time
from collections.abc import Sequence

import dns.exception
import dns.message
import dns.query
from _smtp_peers import Proc, StartError, free_port

DNSMASQ = "/usr/sbin/dnsmasq"
CLAMD = "/usr/sbin/clamd"
CLAMDSCAN = "/usr/bin/clamdscan"
START_TIMEOUT = 30.0

# The standard 68-byte anti-virus test file (eicar.org).
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_NAME = "Kithmail.Bench.EICAR.UNOFFICIAL"  # clamd appends .UNOFFICIAL to ours
STREAM_MAX_LENGTH = 25 * 1024 * 1024
CHUNK = 64 * 1024

_ANSWERED = re.compile(r"queries forwarded (\d+), queries answered locally (\d+)")


class Dnsmasq:
    """A running dnsmasq; `address` is "127.0.0.1:PORT" for `[dns] nameservers`."""

    def __init__(self, proc: Proc, port: int) -> None:
        self.proc = proc
        self.port = port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def dns_queries(self) -> int:
        """Queries answered so far (its own counter, logged on SIGUSR1)."""
        before = len(_ANSWERED.findall(self.proc.tail(1 << 20)))
        os.kill(self.proc.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            found = _ANSWERED.findall(self.proc.tail(1 << 20))
            if len(found) > before:
                fwd, local = found[-1]
                return int(fwd) + int(local)
            time.sleep(0.002)  # between polls of the log only
        raise StartError(f"dnsmasq logged no statistics after SIGUSR1:\n{self.proc.tail()}")

    def stop(self) -> int:
        return self.proc.stop()


def start_dnsmasq(
    work: str,
    cpus: str,
    *,
    zones: Sequence[str],
    a: Sequence[tuple[str, str]] = (),
    mx: Sequence[tuple[str, str, int]] = (),
    txt: Sequence[tuple[str, str]] = (),
) -> Dnsmasq:
    """dnsmasq serving these records from memory; NXDOMAIN for the rest of `zones`."""
    if not os.path.exists(DNSMASQ):
        raise StartError(f"{DNSMASQ} missing: apt-get install --no-install-recommends dnsmasq")
    for name, value in txt:
        if "," in value or '"' in value:  # dnsmasq splits TXT strings at commas
            raise ValueError(f"TXT {name}: no comma or quote in a bench record")
    port = free_port()
    argv = [
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
        "--cache-size=0",  # nothing is forwarded, so nothing would be cached
        "--log-facility=-",  # to stderr: the Proc's log file
    ]
    argv += [f"--local=/{z}/" for z in zones]
    argv += [f"--host-record={name},{ip}" for name, ip in a]
    argv += [f"--mx-host={d},{h},{p}" for d, h, p in mx]
    # One string each: dnsmasq splits a long one into 255-byte character-strings.
    argv += [f"--txt-record={name},{value}" for name, value in txt]
    p = Proc("dnsmasq", argv, os.path.join(work, "dnsmasq.log"), cpus)
    probe = txt[0][0] if txt else f"ready.{zones[0]}"
    t0 = time.monotonic()
    while True:
        if not p.alive():
            raise StartError(f"dnsmasq exited {p.proc.returncode}:\n{p.tail()}")
        try:
            dns.query.udp(dns.message.make_query(probe, "TXT"), "127.0.0.1", 0.2, port=port)
            return Dnsmasq(p, port)
        except (OSError, dns.exception.Timeout):
            pass
        if time.monotonic() - t0 > START_TIMEOUT:
            p.stop()
            raise StartError(f"dnsmasq does not answer TXT {probe}:\n{p.tail()}")
        time.sleep(0.01)  # between polls only: readiness is an answer


# --------------------------------------------------------------------------
# clamd


class Clamd:
    """A running clamd on a unix socket; `conf` serves clamdscan too."""

    def __init__(self, proc: Proc, sock: str, conf: str, config_lines: list[str]) -> None:
        self.proc = proc
        self.socket = sock
        self.conf = conf
        self.config_lines = config_lines

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    def pids(self) -> list[int]:
        return self.proc.pids()

    def stop(self) -> int:
        rc = self.proc.stop()
        with contextlib.suppress(OSError):
            os.unlink(self.socket)
        return rc


def clamd_command(path: str, command: bytes, body: bytes | None = None) -> bytes:
    """One clamd command over a blocking unix socket; its whole NUL-terminated answer.

    With `body`, the command is zINSTREAM and `body` follows in CHUNK-byte
    chunks, each after its length (4 bytes, big-endian), then a zero length.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30.0)
        s.connect(path)
        s.sendall(command)
        if body is not None:
            view = memoryview(body)
            for i in range(0, len(view), CHUNK):
                part = view[i : i + CHUNK]
                s.sendall(struct.pack(">I", len(part)) + part)
            s.sendall(b"\0\0\0\0")
        out = bytearray()
        while not out.endswith(b"\0"):
            got = s.recv(8192)
            if not got:
                break
            out += got
        return bytes(out)


def start_clamd(work: str, cpus: str) -> Clamd:
    """clamd with the bench's own signatures; ready (PONG) when it returns."""
    if not os.path.exists(CLAMD):
        raise StartError(f"{CLAMD} missing: apt-get install --no-install-recommends clamav-daemon")
    base = os.path.join(work, "clamd")
    db = os.path.join(base, "db")
    tmp = os.path.join(base, "tmp")
    os.makedirs(db)
    os.makedirs(tmp)
    with open(os.path.join(db, "kithmail-bench.ndb"), "w") as f:
        f.write(f"Kithmail.Bench.EICAR:0:*:{EICAR.hex()}\n")
    # A unix socket path is limited to ~107 bytes; the work dir may be long.
    sock = f"/tmp/kithmail-bench-clamd-{os.getpid()}-{time.monotonic_ns()}.sock"
    lines = [
        f"DatabaseDirectory {db}",
        f"TemporaryDirectory {tmp}",
        f"LocalSocket {sock}",
        "Foreground yes",
        f"LogFile {os.path.join(base, 'clamd.log')}",
        "AlertEncrypted yes",
        "AlertExceedsMax yes",
        f"StreamMaxLength {STREAM_MAX_LENGTH}",
        # Every message in the run is scanned in full: without this, libclamav
        # remembers the hash of each clean file (and each attachment in it)
        # and a message seen before would cost a lookup, not a scan.
        "DisableCache yes",
    ]
    conf = os.path.join(base, "clamd.conf")
    with open(conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    p = Proc("clamd", [CLAMD, "-c", conf], os.path.join(base, "clamd.out"), cpus)
    t0 = time.monotonic()
    while True:
        if not p.alive():
            raise StartError(f"clamd exited {p.proc.returncode}:\n{p.tail()}")
        try:
            if clamd_command(sock, b"zPING\0") == b"PONG\0":
                return Clamd(p, sock, conf, lines)
        except OSError:
            pass
        if time.monotonic() - t0 > START_TIMEOUT:
            p.stop()
            raise StartError(f"clamd did not answer PING within {START_TIMEOUT}s:\n{p.tail()}")
        time.sleep(0.01)  # between polls only: readiness is PONG
