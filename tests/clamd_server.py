"""A real clamd for tests: Debian's clamav-daemon on loopback, our own signatures.

`clamd_server(tmp)` starts `clamd` in the foreground with a config and a
database directory written under `tmp`, listening on a unix socket AND on
127.0.0.1 at a free TCP port, waits until both answer `zPING` with `PONG`
(polled; never a fixed sleep), and stops it on exit.

No official databases and no network: with none, clamd finds nothing, not
even EICAR. The database directory holds the tests' own signatures —
`kithmail-test.ndb` (the EICAR test string, anywhere in a file) and
`kithmail-test.hdb` (the MD5 of `OWN_FILE`, a file of our own) — and, unless
`daily_time=None`, a `daily.cud`: an unsigned database container (".cud" is
the one container clamd loads without ClamAV's digital signature) holding
one more signature, whose header makes clamd's VERSION reply carry a
database version and date ("ClamAV 1.4.6/27001/Sun Nov 22 14:08:17 2026"),
as it does with freshclam's daily database. clamd appends ".UNOFFICIAL" to
every name from a database it does not consider official.

The config turns on what the gateway needs reported (`AlertEncrypted yes`,
`AlertExceedsMax yes`), keeps `StreamMaxLength` small so the size-limit
path is reachable, and `MaxRecursion` small so a few nested zips trip
`Heuristics.Limits.Exceeded.MaxRecursion`.

`make test` installs clamav-daemon (DEB_PACKAGES); by hand: `apt-get install
-y --no-install-recommends clamav-daemon`. Its package scripts start no
service here (policy-rc.d refuses) and freshclam is never run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ports import free_port

CLAMD = "/usr/sbin/clamd"
START_TIMEOUT = 10.0

# The standard 68-byte anti-virus test file (eicar.org).
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
# A file of our own, matched by its MD5 (.hdb: the whole file, nothing more).
OWN_FILE = b"kithmail test malware 0d5c8e3a: harmless bytes the tests' clamd knows by hash\n"
# A string matched anywhere, only in the daily database.
DAILY_STRING = b"kithmail-daily-signature-41b7"

EICAR_NAME = "Kithmail.Test.EICAR.UNOFFICIAL"
OWN_NAME = "Kithmail.Test.Own.UNOFFICIAL"
DAILY_NAME = "Kithmail.Test.Daily.UNOFFICIAL"
DAILY_VERSION = 27001

STREAM_MAX_LENGTH = 2 * 1024 * 1024
MAX_RECURSION = 6


def _free_port() -> int:
    return free_port()


def _daily_cud(created: int) -> bytes:
    """An unsigned database container: a 512-byte header, then a tar.

    The tar's `daily.info` repeats the header (clamd checks they agree) and
    lists every other member with its size and SHA-256; `COPYING` first
    tells clamd the tar is not gzipped.
    """
    ndb = f"Kithmail.Test.Daily:0:*:{DAILY_STRING.hex()}\n".encode()
    built = time.strftime("%d %b %Y %H-%M +0000", time.gmtime(created))
    header = f"ClamAV-VDB:{built}:{DAILY_VERSION}:1:90:{'0' * 32}:X:kithmail-tests:{created}"
    info = f"{header}\ndaily.ndb:{len(ndb)}:{hashlib.sha256(ndb).hexdigest()}\n".encode()
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in (
            ("COPYING", b"kithmail tests\n"),
            ("daily.info", info),
            ("daily.ndb", ndb),
        ):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            member.mtime = created
            t.addfile(member, io.BytesIO(data))
    return header.encode().ljust(512, b" ") + tar.getvalue()


def _ping(connect: tuple[int, object]) -> bool:
    family, address = connect
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(address)  # type: ignore[arg-type]
            s.sendall(b"zPING\0")
            return s.recv(16) == b"PONG\0"
    except OSError:
        return False


@dataclass
class Clamd:
    """One running clamd; `unix` and `tcp` are values for `[antivirus] clamd`."""

    directory: Path
    socket_path: Path
    port: int
    proc: subprocess.Popen[bytes]
    signatures_time: int | None  # the daily database's build time, if it has one
    started_in: float  # seconds from exec to both sockets answering PONG

    @property
    def unix(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def tcp(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def log(self) -> str:
        return (self.directory / "clamd.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_clamd(directory: Path, *, daily_time: int | None) -> Clamd:
    """Start clamd with its files in `directory` (made here); ready when it returns."""
    db = directory / "db"
    tmp = directory / "tmp"
    db.mkdir(parents=True)
    tmp.mkdir()
    (db / "kithmail-test.ndb").write_text(f"Kithmail.Test.EICAR:0:*:{EICAR.hex()}\n")
    (db / "kithmail-test.hdb").write_text(
        f"{hashlib.md5(OWN_FILE).hexdigest()}:{len(OWN_FILE)}:Kithmail.Test.Own\n"
    )
    if daily_time is not None:
        (db / "daily.cud").write_bytes(_daily_cud(daily_time))
    # A unix socket path is limited to ~107 bytes; pytest's tmp_path can be long.
    sock = Path(f"/tmp/kithmail-clamd-{directory.stat().st_ino}-{time.monotonic_ns()}.sock")
    port = _free_port()
    conf = directory / "clamd.conf"
    conf.write_text(
        "\n".join(
            [
                f"DatabaseDirectory {db}",
                f"TemporaryDirectory {tmp}",
                f"LocalSocket {sock}",
                f"TCPSocket {port}",
                "TCPAddr 127.0.0.1",
                "Foreground yes",
                f"LogFile {directory / 'clamd.log'}",
                "AlertEncrypted yes",
                "AlertExceedsMax yes",
                f"StreamMaxLength {STREAM_MAX_LENGTH}",
                f"MaxRecursion {MAX_RECURSION}",
                "",
            ]
        )
    )
    t0 = time.monotonic()
    out = (directory / "clamd.out").open("wb")
    proc = subprocess.Popen([CLAMD, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    out.close()
    clamd = Clamd(directory, sock, port, proc, daily_time, 0.0)
    deadline = t0 + START_TIMEOUT
    ready = False
    while time.monotonic() < deadline and proc.poll() is None:
        if _ping((socket.AF_UNIX, str(sock))) and _ping((socket.AF_INET, ("127.0.0.1", port))):
            ready = True
            break
        time.sleep(0.005)  # between polls only: readiness is PONG, not time
    if not ready:
        clamd.stop()
        out_text = (directory / "clamd.out").read_text(errors="replace")
        raise RuntimeError(f"clamd did not answer PING within {START_TIMEOUT}s:\n{out_text}")
    clamd.started_in = time.monotonic() - t0
    return clamd


@contextlib.contextmanager
def clamd_server(directory: Path, *, daily_time: int | None = None) -> Iterator[Clamd]:
    clamd = start_clamd(directory, daily_time=daily_time)
    try:
        yield clamd
    finally:
        clamd.stop()
        clamd.socket_path.unlink(missing_ok=True)
