"""`kith serve` as a real process on loopback, and SMTP clients to talk to it.

`start_gateway(root, **sections)` writes a kithmail.toml (free ports for
every listener, data in `root/var`, Maildirs in `root/var/mail`, trusted
network 127.0.0.1/32 only, so clients bound to 127.0.0.2..254 are
outsiders that Recon and Reputation judge), adds users to its database,
starts `kith serve -c CONFIG` and waits until the inbound port greets
(asked from 127.0.0.1, which is trusted and never held for the pregreet
test). `Gateway.kill()` is `kill -9`; `Gateway.restart()` starts the same
config again over the same data.

`Client` is a line-level SMTP client over a plain socket (asyncio streams),
bound to a chosen source address, for the tests that must send what a
well-behaved library would not (bare LF, over-long lines, talking first).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ports import free_port

from kithmail.db import Database

KITH = Path(sys.executable).parent / "kith"
START_TIMEOUT = 20.0
DOMAIN = "example.test"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, str | Path):
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {v!r}")


def toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        out.append("")
    return "\n".join(out)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path} not written)"


@dataclass
class Gateway:
    root: Path
    config: Path
    port: int
    web_port: int
    policy_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log_from: int = 0
    test_hooks: bool = True
    offset: float = 0.0
    public_port: int = 0
    submission_port: int = 0

    @property
    def data_dir(self) -> Path:
        return self.root / "var"

    @property
    def maildir(self) -> Path:
        return self.data_dir / "mail"

    def messages(self, address: str) -> list[bytes]:
        """The messages delivered to `address`'s Maildir (new/), oldest first."""
        local, _, domain = address.lower().partition("@")
        d = self.maildir / domain / local.split("+", 1)[0] / "new"
        if not d.is_dir():
            return []
        return [p.read_bytes() for p in sorted(d.iterdir(), key=lambda p: p.stat().st_mtime_ns)]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kith(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(KITH), "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            input=input,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"kith {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done

    def start(self) -> None:
        self.starts += 1
        self._log_from = self.log.stat().st_size if self.log.exists() else 0
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [str(KITH), "serve", "-c", str(self.config)]
            + (["--test-hooks"] if self.test_hooks else []),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                last = f"exited with {self.proc.returncode}"
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    line = s.makefile("rb").readline().decode(errors="replace")
                    if line.startswith("220 "):
                        with contextlib.suppress(OSError):
                            s.sendall(b"QUIT\r\n")
                        # Every worker, not just the first: a test that counts what
                        # each worker did must not find one still starting.
                        if self._ready_workers() >= self._workers():
                            return
                    last = f"greeted with {line!r}"
            except ConnectionRefusedError:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.05)
            except OSError as e:
                last = str(e)
        raise RuntimeError(f"kith serve did not start ({last or 'timed out'}):\n{_tail(self.log)}")

    def _workers(self) -> int:
        server = tomllib.loads(self.config.read_text()).get("server", {})
        return int(server.get("workers", 1))

    def _ready_workers(self) -> int:
        with self.log.open("rb") as f:
            f.seek(self._log_from)
            return f.read().decode(errors="replace").count("kithmail ready")

    def advance(self, seconds: float) -> None:
        """Move the server's clock (`kith serve --test-hooks`) forward."""
        self.offset += seconds
        tmp = self.data_dir / "test-clock.tmp"
        tmp.write_text(str(self.offset))
        tmp.replace(self.data_dir / "test-clock")
        time.sleep(0.05)  # the server re-reads the file every 20 ms

    def stop(self) -> int | None:
        """SIGTERM and wait; the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"kith serve ignored SIGTERM:\n{_tail(self.log)}") from None

    def kill(self) -> None:
        """kill -9, the whole process group (workers too)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def wait_for(self, what: str, predicate: Any, timeout: float = 20.0) -> Any:
        """Poll `predicate()` until it returns something true; fail naming `what`."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; log ends:\n{_tail(self.log)}")
            time.sleep(0.05)


def make_gateway(
    root: Path,
    *,
    users: tuple[str, ...] = ("ann@example.test", "bob@example.test"),
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> Gateway:
    """Write the config and the users; not started."""
    root.mkdir(parents=True, exist_ok=True)
    port, web, policy, public = free_port(), free_port(), free_port(), free_port()
    submission = free_port()
    base: dict[str, dict[str, Any]] = {
        "server": {
            "hostname": "mx.kithmail.test",
            "data_dir": root / "var",
            "listeners": {
                "inbound": [f"127.0.0.1:{port}"],
                "web": [f"127.0.0.1:{web}"],
                "policy": [f"127.0.0.1:{policy}"],
                "submission": [f"127.0.0.1:{submission}"],
                "public": [f"127.0.0.1:{public}"],
            },
            "public_url": f"http://127.0.0.1:{public}",
            "spool_reserve": "0",
        },
        "domains": {
            "local": [DOMAIN, "other.test"],
            "downstream": f"maildir:{root / 'var' / 'mail'}",
            "trusted_networks": ["127.0.0.1/32"],
        },
        # Nothing answers DNS here: every SPF check is a temperror, which
        # these tests accept (the anti-spoofing tests serve real zones).
        "dns": {"nameservers": ["127.0.0.1:9"], "timeout": "250ms"},
        "spf": {"temperror": "accept"},
        # Layer 5 would hold every unauthenticated sender (these tests have
        # no DNS to authenticate one): it records in shadow here, and the
        # community tests run it enforcing.
        "community": {"mode": "shadow"},
        "recon": {"min_delay": "2s"},
        "limits": {"pregreet_wait": "0s"},
        "queue": {"backoff": ["1s"]},
        # The daily digest would land in a Maildir whenever a test's clock
        # crosses 08:00 with mail held: off, but in the digest's own tests.
        "digest": {"enabled": False},
    }
    for name, values in (sections or {}).items():
        merged = dict(base.get(name, {}))
        for k, v in values.items():
            if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
                merged[k] = {**merged[k], **v}
            else:
                merged[k] = v
        base[name] = merged
    config = root / "kithmail.toml"
    config.write_text(toml(base))
    (root / "var").mkdir(exist_ok=True)
    db = Database.open(root / "var" / "kithmail.db")
    try:
        db.sync_domains(base["domains"]["local"])
        for u in users:
            db.add_user(u, password="correct horse battery staple")
    finally:
        db.close()
    return Gateway(
        root,
        config,
        port,
        web,
        policy,
        root / "kith-serve.log",
        public_port=public,
        submission_port=submission,
    )


@contextlib.contextmanager
def running_gateway(root: Path, **kw: Any) -> Iterator[Gateway]:
    gw = make_gateway(root, **kw)
    gw.start()
    try:
        yield gw
    finally:
        try:
            gw.stop()
        finally:
            gw.kill()


# ---------------------------------------------------------------- a raw SMTP client


_REPLY = re.compile(rb"^(\d{3})([ -])(.*)$")


@dataclass
class Reply:
    code: int
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def status(self) -> str:
        """The enhanced status code of the last line, or ""."""
        m = re.match(r"(\d\.\d{1,3}\.\d{1,3}) ", self.lines[-1] if self.lines else "")
        return m[1] if m else ""

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class Client:
    """A line-level SMTP client bound to `source` (a 127.0.0.0/8 address)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, port: int, source: str = "127.0.0.2", *, greet: bool = True, host: str = "127.0.0.1"
    ) -> tuple[Client, Reply | None]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=(source, 0), limit=1 << 20), 10
        )
        c = cls(reader, writer)
        return c, (await c.reply() if greet else None)

    async def reply(self, timeout: float = 20) -> Reply:
        r = Reply(0)
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError(f"connection closed; got so far: {r}")
            m = _REPLY.match(line.rstrip(b"\r\n"))
            if not m:
                raise AssertionError(f"not an SMTP reply line: {line!r}")
            r.code = int(m[1])
            r.lines.append(m[3].decode("utf-8", "replace"))
            if m[2] == b" ":
                return r

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> Reply:
        raw = line if isinstance(line, bytes) else line.encode()
        await self.send(raw + b"\r\n")
        return await self.reply()

    async def closed(self, timeout: float = 10) -> bool:
        """True when the server has closed the connection (EOF)."""
        try:
            await asyncio.wait_for(self.reader.read(), timeout)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def transaction(
        self, sender: str, rcpts: list[str], data: bytes, *, ehlo: str = "client.example"
    ) -> list[Reply]:
        """EHLO, MAIL, each RCPT, and DATA when a RCPT was accepted: every reply."""
        out = [await self.cmd(f"EHLO {ehlo}"), await self.cmd(f"MAIL FROM:<{sender}>")]
        ok = False
        for r in rcpts:
            rep = await self.cmd(f"RCPT TO:<{r}>")
            out.append(rep)
            ok = ok or rep.code == 250
        if ok:
            out.append(await self.cmd("DATA"))
            await self.send(data if data.endswith(b"\r\n.\r\n") else data + b".\r\n")
            out.append(await self.reply())
        return out


def message(
    subject: str = "hello", body: str = "Hello, Ann.\r\n", sender: str = "bob@remote.test"
) -> bytes:
    return (
        f"From: {sender}\r\nTo: ann@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@remote.test>\r\n\r\n{body}"
    ).encode()


async def send(
    port: int,
    source: str,
    sender: str,
    rcpts: list[str],
    data: bytes | None = None,
) -> list[Reply]:
    """One whole session: connect, one transaction, QUIT."""
    c, greeting = await Client.connect(port, source)
    assert greeting is not None and greeting.code == 220, greeting
    try:
        return await c.transaction(sender, rcpts, data or message())
    finally:
        with contextlib.suppress(Exception):
            await c.cmd("QUIT")
        await c.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def smtp_quit(smtp: Any, timeout: float = 10.0) -> None:
    """QUIT an aiosmtplib client and wait until its socket is really closed.

    After STARTTLS, quit() returns while the TLS close_notify exchange is
    still running; if `run` ends the event loop then, the plain socket under
    the TLS layer is left to the garbage collector and pytest reports it
    (ResourceWarning) in whichever test happens to collect it next.
    """
    sock = smtp.transport.get_extra_info("socket") if smtp.transport is not None else None
    await smtp.quit()
    deadline = time.monotonic() + timeout
    while sock is not None and sock.fileno() != -1:
        assert time.monotonic() < deadline, "the client's socket did not close after QUIT"
        await asyncio.sleep(0.01)
