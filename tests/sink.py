"""Postfix's smtp-sink as a real SMTP peer for the delivery tests.

`smtp_sink(*options)` starts `/usr/sbin/smtp-sink -v -u postfix -d DIR/%M.`
on 127.0.0.1 at a free port, with any extra options (`-r RCPT` answers
every RCPT with a 4xx, `-f DATA` the end of data with a 5xx, ...), waits
for its 220 greeting (asked, never slept for), and stops it at the end.
Each message it accepts is a file in `dir`, starting with smtp-sink's own
`X-Mail-Args`/`X-Rcpt-Args` records; `-v` logs every command, so a test
counts the RCPTs it was asked (`rcpts()`).

`start_sink(port, *options)` starts one on a given port (a downstream that
was down comes up). Files live under a fresh directory in the system temp
dir: smtp-sink drops to the postfix user, and pytest's tmp_path is 0700.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from postfix_server import SMTP_SINK, _stop, _wait_greeting, free_port


@dataclass
class Sink:
    port: int
    root: Path
    proc: subprocess.Popen[bytes]

    @property
    def dir(self) -> Path:
        return self.root / "mail"

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def messages(self) -> list[bytes]:
        """Every message received whole so far, smtp-sink's X- records included.

        smtp-sink creates a message's file at MAIL and writes it as the data
        arrives, closing it at the final dot (before its 250); a file it
        still holds open is a transaction in progress, not a message yet.
        """
        files = sorted(p for p in self.dir.iterdir() if p.is_file())
        busy = self._open_files()
        return [p.read_bytes() for p in files if p not in busy]

    def _open_files(self) -> set[Path]:
        """The files the sink process holds open now (/proc/PID/fd; we are root)."""
        out: set[Path] = set()
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        with contextlib.suppress(FileNotFoundError):  # the sink has exited: nothing is open
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):  # closed meanwhile
                    out.add(Path(os.readlink(fd)))
        return out

    def log(self) -> str:
        return (self.root / "sink.log").read_text(errors="replace")

    def rcpts(self) -> list[str]:
        """Every RCPT TO command the sink was sent, in order."""
        return [
            line.split("RCPT TO:", 1)[1] for line in self.log().splitlines() if ": RCPT TO:" in line
        ]

    def stop(self) -> None:
        _stop(self.proc, group=False)


def start_sink(root: Path, port: int, *options: str) -> Sink:
    if not Path(SMTP_SINK).exists():
        raise RuntimeError(f"{SMTP_SINK} is missing: apt-get install -y postfix")
    (root / "mail").mkdir(exist_ok=True)
    shutil.chown(root / "mail", "postfix", "postfix")
    log = root / "sink.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                SMTP_SINK,
                "-v",
                "-u",
                "postfix",
                *options,
                "-d",
                f"{root}/mail/%M.",
                f"127.0.0.1:{port}",
                "20",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_greeting(proc, port, "smtp-sink", log)
    except BaseException:
        _stop(proc, group=False)
        raise
    return Sink(port, root, proc)


@contextlib.contextmanager
def sink_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="kith-sink-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def smtp_sink(*options: str) -> Iterator[Sink]:
    with sink_root() as root:
        sink = start_sink(root, free_port(), *options)
        try:
            yield sink
        finally:
            sink.stop()
