#!/usr/bin/env python3
"""A bare aiosmtpd sink: bench/smtp.py's floor for an asyncio SMTP server.

``python bench/_smtp_sink.py HOST PORT [--defer]`` listens on HOST:PORT with
aiosmtpd's own `SMTP` protocol (the same library and version as kithmail's
listener, the default asyncio loop) and a handler that does nothing:

- by default it answers 250 to every RCPT and to the end of DATA, and throws
  the message away;
- with ``--defer`` it answers ``451 4.7.1`` to every RCPT, as Recon answers
  a never-seen source.

``NOOP count`` answers ``250 messages=N deferred=M``, the counters since
start, so the benchmark can check what arrived without a side channel. It
prints "ready" once listening and stops on SIGTERM or SIGINT.

Trusts: its arguments. It keeps nothing; it is for loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class Discard:
    """aiosmtpd handler: count and discard (or defer every recipient)."""

    def __init__(self, defer: bool) -> None:
        self.defer = defer
        self.messages = 0
        self.deferred = 0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.defer:
            self.deferred += 1
            return "451 4.7.1 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages += 1
        return "250 OK"

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        if arg.strip().lower() == "count":
            return f"250 messages={self.messages} deferred={self.deferred}"
        return "250 OK"


async def serve(host: str, port: int, defer: bool) -> None:
    handler = Discard(defer)
    loop = asyncio.get_running_loop()

    def factory() -> Any:
        return SMTP(handler, hostname="aiosmtpd.bench.test", ident="bench sink", decode_data=False)

    server = await loop.create_server(factory, host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()
    print(f"messages={handler.messages} deferred={handler.deferred}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description="A bare aiosmtpd sink for bench/smtp.py.")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--defer", action="store_true", help="answer 451 4.7.1 to every RCPT")
    a = p.parse_args()
    asyncio.run(serve(a.host, a.port, a.defer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
