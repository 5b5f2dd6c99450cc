#!/usr/bin/env python3
"""bench/soak.py's downstream: an SMTP sink that records what was delivered to it.

``python bench/_soak_sink.py HOST PORT RECORD`` listens on HOST:PORT with
aiosmtpd (250 to every RCPT and to the end of DATA) and, for every message
it accepts, appends one line per recipient to RECORD before answering 250::

    <unix time> TAB <X-Soak-Id or -> TAB <recipient> LF

Each line is one ``write`` on a file opened ``O_APPEND``, so it survives a
SIGKILL of this process (the soak kills it on purpose: the gateway must
queue and retry). A message recorded and then killed before its 250 left is
the one case the gateway may deliver twice; the times let the soak tell
those apart from any other duplicate. It prints "ready" once listening and
stops on SIGTERM or SIGINT.

Trusts: its arguments, and the gateway it listens for (loopback only). The
X-Soak-Id is taken from the header block only, cut to 64 printable bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import time
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

_ID = re.compile(rb"^X-Soak-Id:[ \t]*([!-~]{1,64})[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


def soak_id(data: bytes) -> str:
    """The X-Soak-Id of a message's header block, or "-"."""
    head = data.split(b"\r\n\r\n", 1)[0]
    m = _ID.search(head)
    return m[1].decode("ascii") if m else "-"


class Recorder:
    """aiosmtpd handler: record (time, id, recipient) per recipient, then 250."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        sid = soak_id(raw if isinstance(raw, bytes) else raw.encode())
        now = time.time()
        lines = "".join(f"{now:.6f}\t{sid}\t{r.lower()}\n" for r in envelope.rcpt_tos)
        os.write(self.fd, lines.encode())
        return "250 OK recorded"


async def serve(host: str, port: int, record: str) -> None:
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    handler = Recorder(fd)
    loop = asyncio.get_running_loop()

    def factory() -> Any:
        return SMTP(handler, hostname="downstream.soak.test", ident="soak sink", decode_data=False)

    server = await loop.create_server(factory, host, port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()
    os.close(fd)


def main() -> int:
    p = argparse.ArgumentParser(description="The recording downstream of bench/soak.py.")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("record", help="file the deliveries are appended to")
    a = p.parse_args()
    asyncio.run(serve(a.host, a.port, a.record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
