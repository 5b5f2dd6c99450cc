"""SMTP delivery details against aiosmtpd's real SMTP server: STARTTLS, SMTPUTF8.

The server offers STARTTLS with a self-signed certificate (made by
`kithmail.tls.ensure_certificate`): delivery must use it without verifying
it. SMTPUTF8 is named only to a server that offers it; a UTF-8 address to
one that does not is a permanent failure (RFC 6531 §3.2, 5.6.7). Also the
LMTP client's dot-stuffing, whatever the chunking, and DSN fields for
non-ASCII addresses (RFC 6533).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from hypothesis import given
from hypothesis import strategies as st
from postfix_server import free_port
from prometheus_client import CollectorRegistry

from kithmail import config
from kithmail.queue import Queue, dsn
from kithmail.queue.lmtp import DotStuffer
from kithmail.spool import Envelope, Outcome, Recipient, Spool
from kithmail.tls import ensure_certificate

MSG = "Subject: grüße\r\n\r\nbody ü\r\n".encode()


@dataclass
class Got:
    tls: bool
    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    content: bytes


@dataclass
class Handler:
    got: list[Got] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.got.append(
            Got(
                session.ssl is not None,
                envelope.mail_from,
                list(envelope.rcpt_tos),
                list(envelope.mail_options),
                envelope.original_content,
            )
        )
        return "250 2.0.0 kept"


@contextlib.contextmanager
def smtp_server(tmp_path: Path, **kw: Any) -> Iterator[tuple[Handler, int]]:
    cert, key = ensure_certificate(tmp_path / "tls", "downstream.example.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    handler, port = Handler(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=ctx, **kw)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def settings_for(tmp_path: Path, port: int) -> config.Settings:
    return config.from_mapping(
        {
            "server": {"hostname": "mx.kithmail.test", "data_dir": str(tmp_path / "var")},
            "domains": {"local": ["example.test"], "downstream": f"smtp://127.0.0.1:{port}"},
            "queue": {"backoff": ["1h"], "timeout": "20s"},
        }
    )


async def deliver_one(tmp_path: Path, port: int, env: Envelope) -> None:
    spool = Spool(tmp_path / "spool")
    q = Queue(spool, settings_for(tmp_path, port), registry=CollectorRegistry())
    await q.start()
    try:
        qid = await spool.accept(env, MSG)
        q.notify(qid)
        deadline = time.monotonic() + 30
        while qid in spool.queue_ids_sync():
            assert time.monotonic() < deadline, "not delivered in time"
            await asyncio.sleep(0.05)
    finally:
        await q.stop(5)


def envelope(sender: str, *rcpts: str) -> Envelope:
    return Envelope(
        received=time.time(),
        client_ip="192.0.2.7",
        helo="client.example.org",
        mail_from=sender,
        recipients=tuple(Recipient(r, Outcome.DELIVER) for r in rcpts),
        mail_options=("SMTPUTF8", "BODY=8BITMIME"),
    )


def test_starttls_unverified_and_smtputf8_when_offered(tmp_path: Path) -> None:
    with smtp_server(tmp_path, enable_SMTPUTF8=True) as (handler, port):
        asyncio.run(deliver_one(tmp_path, port, envelope("änn@example.org", "jörg@example.test")))
    [got] = handler.got
    assert got.tls  # the self-signed certificate did not stop it
    assert got.mail_from == "änn@example.org" and got.rcpt_tos == ["jörg@example.test"]
    assert "SMTPUTF8" in got.mail_options and "BODY=8BITMIME" in got.mail_options
    assert got.content == MSG


def test_utf8_address_to_a_server_without_smtputf8_bounces(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kithmail.queue")
    with smtp_server(tmp_path, enable_SMTPUTF8=False) as (handler, port):
        asyncio.run(
            deliver_one(tmp_path, port, envelope("", "jörg@example.test", "bob@example.test"))
        )
    [got] = handler.got
    assert got.rcpt_tos == ["bob@example.test"]
    assert "SMTPUTF8" not in got.mail_options
    [line] = [r.getMessage() for r in caplog.records if "jörg" in r.getMessage()]
    assert "state=bounced" in line and "553 5.6.7" in line


def stuffed(data: bytes) -> bytes:
    s = DotStuffer()
    return s.feed(data) + s.end()


@given(
    st.lists(st.sampled_from([b".", b"\r\n", b"a", b"..", b"\r", b"\n"]), max_size=40), st.data()
)
def test_dot_stuffing_does_not_depend_on_chunking(parts: list[bytes], data: st.DataObject) -> None:
    message = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(message)), max_size=6)))
    s, out, last = DotStuffer(), b"", 0
    for cut in [*cuts, len(message)]:
        out += s.feed(message[last:cut])
        last = cut
    assert out + s.end() == stuffed(message)


def test_dot_stuffing_examples() -> None:
    assert stuffed(b".a\r\nb\r\n.\r\n") == b"..a\r\nb\r\n..\r\n.\r\n"
    assert stuffed(b"no newline at end") == b"no newline at end\r\n.\r\n"
    assert stuffed(b"") == b".\r\n"


def test_dsn_status_fields_for_utf8_addresses() -> None:
    assert dsn.xtext_address("bob@example.test") == ("rfc822", "bob@example.test")
    assert dsn.xtext_address("jörg@example.test") == ("utf-8", "j\\x{F6}rg@example.test")
    assert dsn.xtext_address("a\r\nb@example.test") == ("rfc822", "ab@example.test")
