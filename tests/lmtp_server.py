"""A real LMTP server on loopback: aiosmtpd's `LMTP` with a recording handler.

`lmtp_server()` runs aiosmtpd's LMTP (RFC 2033) in its `Controller`
thread on 127.0.0.1 at a free port; the controller connects once before it
returns, so the server is ready. The handler keeps every message it
accepted, with its envelope, and every RCPT it was asked; per address it
can refuse at RCPT (`rcpt_replies`) or answer for that recipient alone
after DATA (`data_replies`) — LMTP's one reply per recipient, which the
handler returns as one line per accepted recipient, in RCPT order.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from postfix_server import free_port


@dataclass
class Delivered:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]


@dataclass
class Recorder:
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_replies: dict[str, str] = field(default_factory=dict)
    messages: list[Delivered] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        with self.lock:
            self.rcpts.append(address)
        reply = self.rcpt_replies.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        replies, kept = [], []
        for rcpt in envelope.rcpt_tos:
            reply = self.data_replies.get(rcpt.lower(), "250 2.0.0 delivered")
            replies.append(reply)
            if reply.startswith("2"):
                kept.append(rcpt)
        if kept:
            with self.lock:
                self.messages.append(
                    Delivered(envelope.mail_from, kept, envelope.content, envelope.mail_options)
                )
        return "\r\n".join(replies)


class _LmtpController(Controller):
    def factory(self) -> LMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


@dataclass
class LmtpServer:
    port: int
    handler: Recorder

    @property
    def url(self) -> str:
        return f"lmtp://127.0.0.1:{self.port}"


@contextlib.contextmanager
def lmtp_server(**smtp_kwargs: Any) -> Iterator[LmtpServer]:
    handler = Recorder()
    port = free_port()
    smtp_kwargs.setdefault("enable_SMTPUTF8", True)
    controller = _LmtpController(handler, hostname="127.0.0.1", port=port, **smtp_kwargs)
    controller.start()
    try:
        yield LmtpServer(port, handler)
    finally:
        controller.stop()
