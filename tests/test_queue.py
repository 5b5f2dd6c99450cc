"""The delivery queue against real peers on loopback.

Postfix's smtp-sink (tests/sink.py) is the SMTP downstream and smarthost:
it keeps every message as a file, logs every command, and with `-r`/`-f`
answers a command with a 4xx/5xx. aiosmtpd's LMTP server
(tests/lmtp_server.py) is the LMTP downstream. dnsmasq serves MX records.
A downstream that is down is a port nothing listens on. Nothing is
mocked; every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lmtp_server import lmtp_server
from postfix_server import free_port
from prometheus_client import CollectorRegistry
from sink import Sink, sink_root, smtp_sink, start_sink

from kithmail import config
from kithmail.dns import Resolver
from kithmail.layers import Action, Layer, Verdict
from kithmail.queue import Queue
from kithmail.spool import Envelope, Outcome, Recipient, Spool, State

HOST = "mx.kithmail.test"
MSG = (
    b"From: Ann <ann@example.org>\r\nTo: bob@example.test\r\nSubject: quarterly figures\r\n"
    b"Message-ID: <m1@example.org>\r\n\r\n"
    b"The secret body line\r\n.leading dot line\r\n..two dots\r\nlast line\r\n"
)
DAY = 86400.0


def make_settings(
    tmp_path: Path, downstream: str, outbound: str = "mx", **queue: Any
) -> config.Settings:
    q: dict[str, Any] = {"backoff": ["1s"], "timeout": "20s"}
    q.update(queue)
    return config.from_mapping(
        {
            "server": {"hostname": HOST, "data_dir": str(tmp_path / "var")},
            "domains": {"local": ["example.test"], "downstream": downstream, "outbound": outbound},
            "queue": q,
            "dns": {"nameservers": ["127.0.0.1:9"], "timeout": "1s"},
        }
    )


def envelope(
    *rcpts: str,
    sender: str = "ann@example.org",
    received: float | None = None,
    reasons: tuple[str, ...] = (),
) -> Envelope:
    verdicts = tuple(Verdict(Layer.SPOOFING, Action.ACCEPT, r) for r in reasons)
    return Envelope(
        received=time.time() if received is None else received,
        client_ip="192.0.2.7",
        helo="client.example.org",
        mail_from=sender,
        recipients=tuple(
            Recipient(r, Outcome.DELIVER, verdicts) for r in rcpts or ("bob@example.test",)
        ),
        mail_options=("BODY=8BITMIME",),
    )


async def wait_for(
    cond: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if not isinstance(got, bool):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(spool: Spool, settings: config.Settings, **kw: Any) -> AsyncIterator[Queue]:
    kw.setdefault("registry", CollectorRegistry())
    q = Queue(spool, settings, **kw)
    await q.start()
    try:
        yield q
    finally:
        await q.stop(5)


def states(spool: Spool, qid: str) -> list[tuple[State, str]]:
    return [(r.state, r.detail) for r in spool.load_sync(qid).recipients]


def gone(spool: Spool, qid: str) -> Callable[[], bool]:
    return lambda: qid not in spool.queue_ids_sync()


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def sink_envelope(raw: bytes) -> tuple[str, list[str]]:
    """(MAIL args, RCPT args) from smtp-sink's records atop a kept message."""
    mail, rcpts = "", []
    for line in raw.split(b"\n"):
        if line.startswith(b"X-Mail-Args: "):
            mail = line[13:].decode().strip()
        elif line.startswith(b"X-Rcpt-Args: "):
            rcpts.append(line[13:].decode().strip())
        elif not line.strip():
            break
    return mail, rcpts


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    v = registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


@pytest.fixture
def outbound() -> Iterator[Sink]:
    """A smarthost sink: where DSNs to outside senders end up."""
    with smtp_sink() as s:
        yield s


# ---------------------------------------------------------------- SMTP


def test_smtp_delivers_all_recipients_in_one_transaction(tmp_path: Path) -> None:
    async def main(sink: Sink) -> None:
        spool = Spool(tmp_path / "spool")
        registry = CollectorRegistry()
        async with running(spool, make_settings(tmp_path, sink.url), registry=registry) as q:
            qid = await spool.accept(envelope("bob@example.test", "Carol@Example.Test"), MSG)
            q.notify(qid)
            await wait_for(gone(spool, qid), "the message to leave the spool")
        [kept] = sink.messages()
        mail, rcpts = sink_envelope(kept)
        assert mail.startswith("<ann@example.org>")
        assert "BODY=8BITMIME" in mail
        assert rcpts == ["<bob@example.test>", "<Carol@Example.Test>"]
        assert kept.endswith(MSG + b"\n") or MSG.replace(b"\r\n", b"\n") in kept
        assert metric(registry, "kithmail_delivery_attempts_total", result="delivered") == 2
        assert metric(registry, "kithmail_delivery_attempts_total", result="deferred") == 0

    with smtp_sink() as sink:
        asyncio.run(main(sink))


def test_smtp_rcpt_4xx_defers_and_retries_after_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main(sink: Sink) -> None:
        spool = Spool(tmp_path / "spool")
        async with running(spool, make_settings(tmp_path, sink.url)) as q:
            qid = await spool.accept(envelope(), MSG)
            q.notify(qid)
            await wait_for(
                lambda: states(spool, qid)[0][1].startswith("attempt 2 "), "a second attempt"
            )
            [(state, detail)] = states(spool, qid)
        assert state is State.DEFERRED
        assert detail.startswith(f"attempt 2 via 127.0.0.1:{sink.port}: 4")
        assert sink.messages() == []
        assert len(sink.rcpts()) >= 2

    caplog.set_level(logging.INFO, logger="kithmail.queue")
    with smtp_sink("-r", "RCPT") as sink:
        asyncio.run(main(sink))
    lines = [r.getMessage() for r in caplog.records if r.name == "kithmail.queue"]
    attempt = next(line for line in lines if "state=deferred" in line)
    assert "rcpt=bob@example.test" in attempt
    assert f"relay=127.0.0.1:{sink.port}" in attempt
    assert "queue_id=" in attempt and "reply=" in attempt and "delay=" in attempt


def test_smtp_data_5xx_bounces_with_a_dsn_to_the_sender(tmp_path: Path, outbound: Sink) -> None:
    async def main(sink: Sink) -> None:
        spool = Spool(tmp_path / "spool")
        registry = CollectorRegistry()
        settings = make_settings(tmp_path, sink.url, outbound=outbound.url)
        async with running(spool, settings, registry=registry) as q:
            qid = await spool.accept(envelope(), MSG)
            q.notify(qid)
            await wait_for(gone(spool, qid), "the bounced message to leave the spool")
            await wait_for(lambda: len(outbound.messages()) == 1, "the DSN at the smarthost")
            await wait_for(lambda: spool.queue_ids_sync() == [], "the DSN to leave the spool")
        assert metric(registry, "kithmail_delivery_attempts_total", result="bounced") == 1
        assert metric(registry, "kithmail_dsn_sent_total") == 1
        [raw] = outbound.messages()
        mail, rcpts = sink_envelope(raw)
        assert mail.startswith("<>") and rcpts == ["<ann@example.org>"]
        report = parse(raw.split(b"\n", 5)[5] if False else raw)
        status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
        text = status.as_string()
        assert "Final-Recipient: rfc822; bob@example.test" in text
        assert "Action: failed" in text
        assert "Status: 5." in text
        assert "Diagnostic-Code: smtp; 5" in text

    with smtp_sink("-f", "DATA") as sink:
        asyncio.run(main(sink))


def test_downstream_down_defers_then_delivers_when_it_comes_up(tmp_path: Path) -> None:
    port = free_port()

    async def main(root: Path) -> None:
        spool = Spool(tmp_path / "spool")
        async with running(spool, make_settings(tmp_path, f"smtp://127.0.0.1:{port}")) as q:
            qid = await spool.accept(envelope(), MSG)
            q.notify(qid)
            await wait_for(lambda: states(spool, qid)[0][0] is State.DEFERRED, "a deferral")
            [(_, detail)] = states(spool, qid)
            assert detail.startswith(f"attempt 1 via 127.0.0.1:{port}: 451 4.4.")
            sink = await asyncio.to_thread(start_sink, root, port)
            try:
                await q.flush(qid)
                await wait_for(gone(spool, qid), "delivery once the sink is up")
                assert len(sink.messages()) == 1
            finally:
                sink.stop()

    with sink_root() as root:
        asyncio.run(main(root))


def test_queue_timeout_defers_and_the_gauges_count_the_message(tmp_path: Path) -> None:
    async def main(sink: Sink) -> None:
        spool = Spool(tmp_path / "spool")
        registry = CollectorRegistry()
        settings = make_settings(tmp_path, sink.url, timeout="1s", backoff=["1h"])
        async with running(spool, settings, registry=registry) as q:
            qid = await spool.accept(envelope(received=time.time() - 120), MSG)
            q.notify(qid)
            await wait_for(lambda: states(spool, qid)[0][0] is State.DEFERRED, "a deferral")
            [(_, detail)] = states(spool, qid)
            assert detail.startswith(f"attempt 1 via 127.0.0.1:{sink.port}: 451 4.4.2")
            await wait_for(lambda: metric(registry, "kithmail_queue_messages") == 1, "the gauge")
            assert metric(registry, "kithmail_queue_oldest_seconds") >= 120
        assert metric(registry, "kithmail_delivery_attempts_total", result="deferred") == 1
        # The sink opens its file at DATA; the message never got that far.
        assert all(b"secret body" not in m for m in sink.messages())

    with smtp_sink("-w", "60") as sink:  # waits 60 s before answering DATA
        asyncio.run(main(sink))


def test_a_cancelled_attempt_leaves_the_recipient_pending(tmp_path: Path) -> None:
    async def main(sink: Sink) -> None:
        spool = Spool(tmp_path / "spool")
        q = Queue(spool, make_settings(tmp_path, sink.url), registry=CollectorRegistry())
        await q.start()
        qid = await spool.accept(envelope(), MSG)
        q.notify(qid)
        await wait_for(lambda: "DATA" in sink.log(), "the attempt to reach DATA")
        await q.stop(0.2)
        assert states(spool, qid) == [(State.PENDING, "")]

    with smtp_sink("-w", "60") as sink:  # waits 60 s before answering DATA
        asyncio.run(main(sink))


# ---------------------------------------------------------------- LMTP


def test_lmtp_one_reply_per_recipient(tmp_path: Path, outbound: Sink) -> None:
    async def main(url: str) -> str:
        spool = Spool(tmp_path / "spool")
        settings = make_settings(tmp_path, url, outbound=outbound.url)
        async with running(spool, settings) as q:
            qid = await spool.accept(
                envelope("bob@example.test", "nobody@example.test", "full@example.test"), MSG
            )
            q.notify(qid)
            await wait_for(
                lambda: all(s is not State.PENDING for s, _ in states(spool, qid)), "three results"
            )
            await wait_for(lambda: len(outbound.messages()) == 1, "the DSN for nobody@")
            result = states(spool, qid)
        (s1, d1), (s2, d2), (s3, d3) = result
        assert s1 is State.DELIVERED and "250 2.0.0 delivered" in d1
        assert s2 is State.BOUNCED and "550 5.1.1 no such user" in d2
        assert s3 is State.DEFERRED and d3.startswith("attempt 1 via ") and "452 4.2.2" in d3
        return qid

    with lmtp_server() as server:
        server.handler.rcpt_replies["nobody@example.test"] = "550 5.1.1 no such user"
        server.handler.data_replies["full@example.test"] = "452 4.2.2 mailbox full"
        asyncio.run(main(server.url))
        [got] = server.handler.messages
    assert got.mail_from == "ann@example.org"
    assert got.rcpt_tos == ["bob@example.test"]
    assert got.data == MSG  # dot-stuffing undone by the server, byte for byte
    assert "BODY=8BITMIME" in got.mail_options
    dsn = outbound.messages()[0]
    assert b"Final-Recipient: rfc822; nobody@example.test" in dsn
    assert b"full@example.test" not in dsn.split(b"text/rfc822-headers")[0]


def test_lmtp_streams_a_big_message_intact(tmp_path: Path) -> None:
    body = b"".join(b".line %d with a leading dot\r\n" % i for i in range(60000))
    big = b"Subject: big\r\n\r\n" + body

    async def main(url: str) -> None:
        spool = Spool(tmp_path / "spool")
        async with running(spool, make_settings(tmp_path, url)) as q:
            qid = await spool.accept(envelope(), big)
            q.notify(qid)
            await wait_for(gone(spool, qid), "delivery")

    with lmtp_server(data_size_limit=0) as server:
        asyncio.run(main(server.url))
        [got] = server.handler.messages
    assert got.data == big


# ---------------------------------------------------------------- maildir


def test_maildir_layout_and_headers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mail = tmp_path / "mail"

    async def main() -> None:
        spool = Spool(tmp_path / "spool")
        async with running(spool, make_settings(tmp_path, f"maildir:{mail}")) as q:
            qid = await spool.accept(
                envelope("Bob+News@Example.Test", "../etc@example.test", "carol@example.test"),
                MSG,
            )
            q.notify(qid)
            await wait_for(gone(spool, qid), "every recipient final")

    caplog.set_level(logging.INFO, logger="kithmail.queue")
    asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "rcpt=" in r.getMessage()]
    [bad] = [line for line in lines if "rcpt=../etc@example.test" in line]
    assert "state=bounced" in bad and "550 5.1.3" in bad
    assert sum("state=delivered" in line and "relay=maildir" in line for line in lines) == 2
    box = mail / "example.test" / "bob"
    assert sorted(p.name for p in box.iterdir()) == ["cur", "new", "tmp"]
    assert list((box / "tmp").iterdir()) == [] and list((box / "cur").iterdir()) == []
    [copy] = list((box / "new").iterdir())
    assert ":" not in copy.name and HOST in copy.name
    data = copy.read_bytes()
    assert data.startswith(b"Return-Path: <ann@example.org>\nDelivered-To: Bob+News@Example.Test\n")
    assert data.endswith(MSG.replace(b"\r\n", b"\n"))
    assert b"\r" not in data
    assert len(list((mail / "example.test" / "carol" / "new").iterdir())) == 1
    # Nothing escaped the maildir root.
    assert sorted(p.name for p in mail.iterdir()) == ["example.test"]
    assert sorted(p.name for p in (mail / "example.test").iterdir()) == ["bob", "carol"]


# ---------------------------------------------------------------- expiry and DSNs


def test_lifetime_expiry_bounces_with_a_headers_only_dsn(tmp_path: Path, outbound: Sink) -> None:
    down = f"smtp://127.0.0.1:{free_port()}"

    async def main() -> str:
        spool = Spool(tmp_path / "spool")
        settings = make_settings(tmp_path, down, outbound=outbound.url, lifetime="5d")
        async with running(spool, settings) as q:
            qid = await spool.accept(envelope(received=time.time() - 6 * DAY), MSG)
            q.notify(qid)
            await wait_for(gone(spool, qid), "the expired message to leave the spool")
            await wait_for(lambda: len(outbound.messages()) == 1, "the DSN")
        return qid

    qid = asyncio.run(main())
    raw = outbound.messages()[0]
    mail, rcpts = sink_envelope(raw)
    assert mail.startswith("<>") and rcpts == ["<ann@example.org>"]
    dsn = parse(raw[raw.index(b"From: ") :])
    assert dsn["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
    assert b"\r\nTo: <ann@example.org>\r\n" in raw or b"\nTo: <ann@example.org>\n" in raw
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    parts = [p.get_content_type() for p in dsn.iter_parts()]
    assert parts == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = raw.split(b"message/delivery-status", 1)[1].decode()
    assert f"Reporting-MTA: dns; {HOST}" in status
    assert "Final-Recipient: rfc822; bob@example.test" in status
    assert "Action: failed" in status
    assert "Status: 4.4." in status
    assert f"X-Kithmail-Queue-ID: {qid}" in status
    headers = raw.split(b"text/rfc822-headers", 1)[1]
    assert b"Subject: quarterly figures" in headers
    assert b"secret body line" not in raw  # headers only, never the body


def test_no_dsn_for_the_null_sender_or_an_spf_failure(tmp_path: Path, outbound: Sink) -> None:
    async def main(sink: Sink) -> None:
        spool = Spool(tmp_path / "spool")
        registry = CollectorRegistry()
        settings = make_settings(tmp_path, sink.url, outbound=outbound.url)
        async with running(spool, settings, registry=registry) as q:
            ids = [
                await spool.accept(envelope(sender=""), MSG),
                await spool.accept(envelope(reasons=("spf.fail",)), MSG),
                await spool.accept(envelope(reasons=("spf.softfail",)), MSG),
            ]
            for qid in ids:
                q.notify(qid)
            await wait_for(lambda: spool.queue_ids_sync() == [], "every message bounced")
        assert metric(registry, "kithmail_delivery_attempts_total", result="bounced") == 3
        assert metric(registry, "kithmail_dsn_sent_total") == 0

    with smtp_sink("-f", "RCPT") as sink:
        asyncio.run(main(sink))
    assert outbound.messages() == []


def test_header_injection_from_the_sender_stays_out_of_dsn_headers(
    tmp_path: Path, outbound: Sink
) -> None:
    async def main(sink: Sink) -> None:
        spool = Spool(tmp_path / "spool")
        settings = make_settings(tmp_path, sink.url, outbound=outbound.url)
        async with running(spool, settings) as q:
            qid = await spool.accept(envelope(sender="ann@example.org\r\nBcc: x@evil.example"), MSG)
            q.notify(qid)
            await wait_for(lambda: len(outbound.messages()) == 1, "the DSN")

    with smtp_sink("-f", "RCPT") as sink:
        asyncio.run(main(sink))
    raw = outbound.messages()[0]
    head = raw.split(b"\n\n", 1)[0] if b"\r\n\r\n" not in raw else raw.split(b"\r\n\r\n", 1)[0]
    assert b"\nBcc:" not in head


# ---------------------------------------------------------------- restart, other processes


def test_a_new_queue_resumes_what_an_old_one_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    settings = make_settings(tmp_path, f"smtp://127.0.0.1:{port}", backoff=["1h"])

    async def first() -> str:
        spool = Spool(tmp_path / "spool")
        async with running(spool, settings) as q:
            qid = await spool.accept(envelope(), MSG)
            q.notify(qid)
            await wait_for(lambda: states(spool, qid)[0][0] is State.DEFERRED, "a deferral")
        return qid

    async def second(qid: str, sink: Sink) -> None:
        spool = Spool(tmp_path / "spool")
        assert (await spool.recover()).pending == (qid,)
        # One hour of backoff: a clock two hours on makes it due at start.
        async with running(spool, settings, clock=lambda: time.time() + 7200):
            await wait_for(gone(spool, qid), "delivery by the new queue")

    caplog.set_level(logging.INFO, logger="kithmail.queue")
    qid = asyncio.run(first())
    with sink_root() as root:
        sink = start_sink(root, port)
        try:
            asyncio.run(second(qid, sink))
            assert len(sink.messages()) == 1
        finally:
            sink.stop()
    # The attempt count came back from the state records, not from memory.
    [done] = [r.getMessage() for r in caplog.records if "state=delivered" in r.getMessage()]
    assert "attempt=2" in done


def test_mail_accepted_by_another_process_is_picked_up(tmp_path: Path, run_python: Any) -> None:
    async def main(sink: Sink) -> None:
        spool = Spool(tmp_path / "spool")
        async with running(spool, make_settings(tmp_path, sink.url)):
            done = await asyncio.to_thread(
                run_python,
                "import sys, time\n"
                "from kithmail.spool import Spool, Envelope, Recipient, Outcome\n"
                "env = Envelope(time.time(), '192.0.2.7', 'h', 'ann@example.org',\n"
                "               (Recipient('bob@example.test', Outcome.DELIVER),))\n"
                "print(Spool(sys.argv[1]).accept_sync(env, b'Subject: x\\r\\n\\r\\nhi\\r\\n'))\n",
                str(tmp_path / "spool"),
            )
            assert done.returncode == 0, done.stderr
            qid = done.stdout.strip()
            await wait_for(gone(spool, qid), "delivery without notify()", timeout=10)
        assert len(sink.messages()) == 1

    with smtp_sink() as sink:
        asyncio.run(main(sink))


# ---------------------------------------------------------------- MX


def test_mx_delivery_in_preference_order_with_fallback(tmp_path: Path, dnsmasq: Any) -> None:
    async def main(sink: Sink) -> None:
        dns = dnsmasq(
            zones=("example.org", "example.net", "example.com"),
            mx=[
                ("example.org", "mx1.example.org", 10),
                ("example.org", "mx2.example.org", 20),
                ("example.com", ".", 0),
            ],
            a=[
                ("mx1.example.org", "127.0.0.2"),
                ("mx2.example.org", "127.0.0.1"),
                ("example.net", "127.0.0.1"),
            ],
        )
        settings = config.from_mapping(
            {
                "server": {"hostname": HOST, "data_dir": str(tmp_path / "var")},
                "domains": {"local": ["example.test"], "downstream": "maildir:/nonexistent"},
                "queue": {"backoff": ["1h"]},
                "dns": {"nameservers": [dns.address], "timeout": "2s"},
            }
        )
        spool = Spool(tmp_path / "spool")
        resolver = Resolver.from_settings(settings.dns)
        async with running(spool, settings, resolver=resolver, mx_port=sink.port) as q:
            qid = await spool.accept(
                envelope(
                    "dave@example.org",
                    "erin@example.net",
                    "fred@example.com",
                    "gina@nowhere.example.org",
                    sender="",
                ),
                MSG,
            )
            q.notify(qid)
            await wait_for(gone(spool, qid), "every recipient final")
        # mx1 (127.0.0.2) has nothing listening there: mx2 took it.
        got = sorted(r for m in sink.messages() for r in sink_envelope(m)[1])
        assert got == ["<dave@example.org>", "<erin@example.net>"]

    with smtp_sink() as sink:
        asyncio.run(main(sink))
