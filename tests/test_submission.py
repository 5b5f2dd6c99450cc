"""The submission listener and journaling, in-process against real peers.

Each test starts, in its own event loop, the submission listener and the
inbound listener on free loopback ports (`asyncio` servers over
`SubmissionSession` and `InboundSession`), built as `kith serve` builds
them: a real core in tmp_path, a real SQLite database with argon2 hashes, a
real spool and delivery queue, the TLS context `kithmail.tls.server_context`
makes. Outbound mail is caught by Postfix's smtp-sink (`[domains] outbound`),
local mail lands in a Maildir, and DKIM signatures are checked with dkimpy
against the key record `kith dkim keygen` printed, served by a real dnsmasq.
Clients are aiosmtplib (STARTTLS, AUTH) or the raw client of tests/gateway.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest
from argon2 import PasswordHasher
from clamd_server import EICAR, Clamd, clamd_server
from dns_server import Dnsmasq, StartDnsmasq
from gateway import Client, Reply, smtp_quit
from prometheus_client import CollectorRegistry
from sink import Sink, smtp_sink

import kithmail
from kithmail import config, tls
from kithmail.db import Database
from kithmail.dkimkeys import keygen
from kithmail.dns import Resolver
from kithmail.layers.antivirus import Antivirus
from kithmail.layers.community import Community
from kithmail.pipeline import Pipeline
from kithmail.queue import Queue
from kithmail.smtp.inbound import Gateway
from kithmail.smtp.submission import Submission
from kithmail.spf import SpfChecker
from kithmail.spool import Spool
from kithmail.tenants import Policies

ANN, ANN_PW = "ann@example.test", "correct horse battery staple"
BOB, BOB_PW = "bob@example.test", "bob's own long password"
GONE = "gone@example.test"  # a disabled user
OUTSIDER = "127.0.0.50"  # a client address outside the trusted networks
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


@dataclass
class Env:
    sub_port: int
    in_port: int
    core: kithmail.Core
    db: Database
    spool: Spool
    data_dir: Path
    maildir: Path

    def community(self, user: str) -> dict[str, str]:
        return {e.entry: e.source for e in self.core.community.list(user)}

    def maildir_messages(self, address: str) -> list[bytes]:
        local, _, domain = address.partition("@")
        d = self.maildir / domain / local / "new"
        return [p.read_bytes() for p in sorted(d.iterdir())] if d.is_dir() else []


@contextlib.asynccontextmanager
async def listeners(
    tmp_path: Path, sink: Sink | None = None, **sections: dict[str, Any]
) -> AsyncIterator[Env]:
    data_dir = tmp_path / "var"
    base: dict[str, dict[str, Any]] = {
        "server": {"hostname": "mx.example.test", "data_dir": str(data_dir)},
        "domains": {
            "local": ["example.test"],
            "downstream": f"maildir:{tmp_path / 'mail'}",
            "outbound": sink.url if sink is not None else "smtp://127.0.0.1:9",
        },
        "limits": {"pregreet_wait": 0},
        "submission": {"journal_address": "journal@example.test"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    settings = config.from_mapping(base)
    db = Database.open(data_dir / "kithmail.db", hasher=FAST)
    db.sync_domains(settings.domains.local)
    db.add_user(ANN, password=ANN_PW)
    db.add_user(BOB, password=BOB_PW)
    db.add_user(GONE, password="a password never to work")
    db.set_disabled(GONE, True)
    core = kithmail.Core(str(data_dir / "core"), map_size=256 << 20)
    spool = Spool(data_dir / "spool")
    await spool.recover()
    pipeline = Pipeline(
        settings,
        core,
        Resolver.from_settings(settings.dns),
        SpfChecker(settings.dns.nameservers, settings.dns.timeout),
        trusted_message_layers=[Antivirus(registry=CollectorRegistry())],
        community=Community(core),
    )
    queue = Queue(spool, settings, registry=CollectorRegistry(), scan_interval=0.1)
    gw = Gateway(
        settings=settings,
        pipeline=pipeline,
        policies=Policies(settings, db.tenant_of),
        spool=spool,
        find_user=db.find_user,
        tls_context=tls.server_context(settings),
        on_accepted=queue.notify,
    )
    sub = Submission(gw, db, core, data_dir)
    gw.journal = sub.journal
    loop = asyncio.get_running_loop()
    s_server = await loop.create_server(sub.factory, "127.0.0.1", 0)
    i_server = await loop.create_server(gw.factory, "127.0.0.1", 0)
    await queue.start()
    try:
        yield Env(
            s_server.sockets[0].getsockname()[1],
            i_server.sockets[0].getsockname()[1],
            core,
            db,
            spool,
            data_dir,
            tmp_path / "mail",
        )
    finally:
        for s in (s_server, i_server):
            s.close()
        await queue.stop(5)
        db.close()
        core.close()


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # self-signed under data_dir/tls
    return ctx


async def submit_client(env: Env, source: str = OUTSIDER) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=env.sub_port,
        source_address=(source, 0),
        start_tls=False,
        tls_context=client_context(),
        timeout=20,
    )
    await smtp.connect()
    await smtp.ehlo(hostname="laptop.example.test")
    await smtp.starttls()
    await smtp.ehlo(hostname="laptop.example.test")
    return smtp


async def raw_tls(env: Env, source: str = OUTSIDER) -> Client:
    """The raw client of tests/gateway.py, after EHLO, STARTTLS and EHLO again."""
    c, greeting = await Client.connect(env.sub_port, source)
    assert greeting is not None and greeting.code == 220
    await c.cmd("EHLO laptop.example.test")
    assert (await c.cmd("STARTTLS")).code == 220
    await c.writer.start_tls(client_context())
    ehlo = await c.cmd("EHLO laptop.example.test")
    assert "AUTH PLAIN LOGIN" in ehlo.lines
    return c


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def pair(r: Reply) -> tuple[int, str]:
    return (r.code, r.status)


def msg(sender: str, to: str, subject: str = "Hello", cc: str | None = None) -> bytes:
    lines = [
        f"From: Ann <{sender}>",
        f"To: {to}",
        *([f"Cc: {cc}"] if cc else []),
        f"Subject: {subject}",
        "Date: Thu, 01 Jan 2026 10:00:00 +0000",
        f"Message-ID: <{abs(hash((sender, to, subject)))}@example.test>",
        "",
        "Shall we meet on Friday?",
        "",
    ]
    return "\r\n".join(lines).encode()


async def until(what: str, predicate: Callable[[], Any], timeout: float = 20) -> Any:
    """Wait for a side effect (a delivery), asked for rather than slept for."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- AUTH ------------------------------------------------------------------------------------


def test_auth_is_not_offered_nor_accepted_before_starttls(tmp_path: Path) -> None:
    async def go() -> None:
        async with listeners(tmp_path) as env:
            c, _ = await Client.connect(env.sub_port, OUTSIDER)
            ehlo = await c.cmd("EHLO laptop.example.test")
            assert "STARTTLS" in ehlo.lines
            assert not any(x.startswith("AUTH") for x in ehlo.lines)
            r = await c.cmd("AUTH PLAIN " + b64(f"\0{ANN}\0{ANN_PW}"))
            assert pair(r) == (538, "5.7.11")
            r = await c.cmd(f"MAIL FROM:<{ANN}>")
            assert pair(r) == (530, "5.7.0")
            await c.close()

    run(go())


def test_mail_before_auth_is_refused_inside_tls(tmp_path: Path) -> None:
    async def go() -> None:
        async with listeners(tmp_path) as env:
            c = await raw_tls(env)
            assert pair(await c.cmd(f"MAIL FROM:<{ANN}>")) == (530, "5.7.0")
            await c.close()

    run(go())


def test_auth_plain_and_login_succeed_after_starttls(tmp_path: Path) -> None:
    async def go() -> None:
        async with listeners(tmp_path) as env:
            smtp = await submit_client(env)
            assert "plain" in smtp.server_auth_methods and "login" in smtp.server_auth_methods
            r = await smtp.auth_plain(ANN, ANN_PW)
            assert (r.code, r.message.split()[0]) == (235, "2.7.0")
            await smtp_quit(smtp)
            smtp = await submit_client(env)
            r = await smtp.auth_login(BOB, BOB_PW)
            assert (r.code, r.message.split()[0]) == (235, "2.7.0")
            await smtp_quit(smtp)
            # login() chooses a mechanism itself; AUTH is not offered once done.
            smtp = await submit_client(env)
            await smtp.login(ANN, ANN_PW)
            r2 = await smtp.ehlo(hostname="laptop.example.test")
            assert "AUTH" not in r2.message
            await smtp_quit(smtp)

    run(go())


def test_plain_by_continuation_login_with_initial_response_and_cancel(tmp_path: Path) -> None:
    async def go() -> None:
        async with listeners(tmp_path) as env:
            c = await raw_tls(env)
            assert (await c.cmd("AUTH PLAIN")).lines == [""]  # "334 " and an empty challenge
            assert pair(await c.cmd("*")) == (501, "5.0.0")
            assert (await c.cmd("AUTH LOGIN " + b64(ANN))).text == b64("Password:")
            assert pair(await c.cmd("not base64!")) == (501, "5.5.2")
            assert (await c.cmd("AUTH LOGIN")).text == b64("Username:")
            assert (await c.cmd(b64(ANN))).code == 334
            assert pair(await c.cmd(b64(ANN_PW))) == (235, "2.7.0")
            assert pair(await c.cmd("AUTH PLAIN " + b64(f"\0{ANN}\0{ANN_PW}"))) == (503, "5.5.1")
            await c.close()
            # Base64 is decoded strictly: padding missing, or junk inside, is refused.
            c = await raw_tls(env)
            bad = b64(f"\0{ANN}\0{ANN_PW}").rstrip("=") + "="
            assert pair(await c.cmd("AUTH PLAIN " + bad + "==")) == (501, "5.5.2")
            assert pair(await c.cmd("AUTH CRAM-MD5")) == (504, "5.5.4")
            await c.close()

    run(go())


def test_wrong_password_unknown_and_disabled_users_get_one_reply(tmp_path: Path) -> None:
    async def go() -> None:
        async with listeners(tmp_path) as env:
            replies = []
            for authzid, account, password in (
                ("", ANN, "wrong password"),
                ("", "nobody@example.test", ANN_PW),
                ("", GONE, "a password never to work"),
                # The authorization identity must be the account's own (RFC 4616 §2).
                (BOB, ANN, ANN_PW),
            ):
                c = await raw_tls(env)
                r = await c.cmd("AUTH PLAIN " + b64(f"{authzid}\0{account}\0{password}"))
                replies.append(str(r))
                # Still not authenticated.
                assert pair(await c.cmd(f"MAIL FROM:<{ANN}>")) == (530, "5.7.0")
                await c.close()
            assert set(replies) == {"535 5.7.8 Authentication credentials invalid"}, replies

    run(go())


def test_brute_force_from_one_address_is_cut_off_with_421(tmp_path: Path) -> None:
    async def go() -> None:
        async with listeners(
            tmp_path,
            submission={
                "auth_failures_per_ip_per_hour": 3,
                "auth_failures_per_account_per_hour": 50,
            },
        ) as env:
            c = await raw_tls(env)
            for _ in range(2):
                r = await c.cmd("AUTH LOGIN " + b64(ANN))
                assert pair(await c.cmd(b64("guess"))) == (535, "5.7.8")
            r = await c.cmd("AUTH LOGIN " + b64(ANN))
            r = await c.cmd(b64("guess"))
            assert pair(r) == (421, "4.7.0")
            assert await c.closed()
            # A new connection from that address is refused before any check,
            # even with the right password; another address still gets in.
            c = await raw_tls(env)
            r = await c.cmd("AUTH PLAIN " + b64(f"\0{ANN}\0{ANN_PW}"))
            assert pair(r) == (421, "4.7.0")
            assert await c.closed()
            c = await raw_tls(env, source="127.0.0.51")
            assert pair(await c.cmd("AUTH PLAIN " + b64(f"\0{ANN}\0{ANN_PW}"))) == (235, "2.7.0")
            await c.close()

    run(go())


def test_guessing_one_account_from_many_addresses_is_cut_off(tmp_path: Path) -> None:
    async def go() -> None:
        async with listeners(
            tmp_path,
            submission={
                "auth_failures_per_ip_per_hour": 50,
                "auth_failures_per_account_per_hour": 2,
            },
        ) as env:
            c = await raw_tls(env, source="127.0.0.61")
            assert pair(await c.cmd("AUTH PLAIN " + b64(f"\0{BOB}\0guess1"))) == (535, "5.7.8")
            await c.close()
            c = await raw_tls(env, source="127.0.0.62")
            assert pair(await c.cmd("AUTH PLAIN " + b64(f"\0{BOB}\0guess2"))) == (421, "4.7.0")
            assert await c.closed()
            c = await raw_tls(env, source="127.0.0.63")
            assert pair(await c.cmd("AUTH PLAIN " + b64(f"\0{BOB}\0{BOB_PW}"))) == (421, "4.7.0")
            # Other accounts are not affected.
            c = await raw_tls(env, source="127.0.0.63")
            assert pair(await c.cmd("AUTH PLAIN " + b64(f"\0{ANN}\0{ANN_PW}"))) == (235, "2.7.0")
            await c.close()

    run(go())


# --- the envelope sender ---------------------------------------------------------------------


def test_the_envelope_sender_must_be_the_users_own(tmp_path: Path) -> None:
    async def go() -> None:
        async with listeners(tmp_path) as env:
            smtp = await submit_client(env)
            await smtp.login(ANN, ANN_PW)
            for sender in (BOB, "ann@example.org", "ann.x@example.test"):
                with pytest.raises(aiosmtplib.SMTPSenderRefused) as e:
                    await smtp.mail(sender)
                assert e.value.code == 553
                assert e.value.message == "5.7.1 Sender address not owned by you"
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as e:
                await smtp.mail("")
            assert (e.value.code, e.value.message[:5]) == (553, "5.7.1")
            # Its own address in any case, or a +tag of it, is fine.
            for sender in ("ANN@Example.TEST", "ann+lists@example.test"):
                r = await smtp.mail(sender)
                assert r.code == 250
                await smtp.rset()
            await smtp_quit(smtp)
        assert env.spool.queue_ids_sync() == []

    run(go())


def test_messages_per_user_are_rate_limited(tmp_path: Path) -> None:
    async def go() -> None:
        async with listeners(tmp_path, submission={"messages_per_user_per_hour": 2}) as env:
            smtp = await submit_client(env)
            await smtp.login(ANN, ANN_PW)
            for _ in range(2):
                assert (await smtp.mail(ANN)).code == 250
                await smtp.rset()
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as e:
                await smtp.mail(ANN)
            assert (e.value.code, e.value.message[:5]) == (451, "4.7.1")
            await smtp_quit(smtp)
            # Bob has his own count.
            smtp = await submit_client(env)
            await smtp.login(BOB, BOB_PW)
            assert (await smtp.mail(BOB)).code == 250
            await smtp_quit(smtp)

    run(go())


# --- relaying, teaching, DKIM ---------------------------------------------------------------


def _dnsfunc(server: Dnsmasq) -> Any:
    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        qname = name.decode() if isinstance(name, bytes) else name
        reply = dns.query.udp(
            dns.message.make_query(qname, dns.rdatatype.TXT),
            "127.0.0.1",
            port=server.port,
            timeout=2,
        )
        for rrset in reply.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return None

    return lookup


def _as_sent(kept: bytes) -> bytes:
    """The message as the sink received it: smtp-sink's X- records and Received removed."""
    lines = kept.replace(b"\r\n", b"\n").split(b"\n")
    while lines and lines[0].split(b":", 1)[0] in (
        b"X-Client-Addr",
        b"X-Client-Proto",
        b"X-Helo-Args",
        b"X-Mail-Args",
        b"X-Rcpt-Args",
    ):
        lines.pop(0)
    if lines and lines[0].startswith(b"Received: ") and b"(smtp-sink)" in b"".join(lines[:3]):
        lines.pop(0)  # smtp-sink's own trace field and its continuation lines
        while lines and lines[0][:1] in (b" ", b"\t"):
            lines.pop(0)
    return b"\r\n".join(lines)


def test_relay_out_is_dkim_signed_delivered_and_teaches_the_community(
    tmp_path: Path, dnsmasq: StartDnsmasq
) -> None:
    _, record = keygen(tmp_path / "var", "example.test", "kithmail")
    server = dnsmasq(
        zones=["example.test"],
        txt=[("kithmail._domainkey.example.test", re.findall(r'"([^"]*)"', record))],
    )

    async def go(sink: Sink) -> None:
        async with listeners(tmp_path, sink) as env:
            smtp = await submit_client(env)
            await smtp.login(ANN, ANN_PW)
            errors, reply = await smtp.sendmail(
                ANN, ["Carol@Partner.Example"], msg(ANN, "carol@partner.example")
            )
            await smtp_quit(smtp)
            assert errors == {} and reply.startswith("2.0.0 Ok: queued as ")
            kept = await until("the sink to receive it", sink.messages)
            assert len(kept) == 1
            assert env.community(ANN) == {"carol@partner.example": "outbound"}
            assert env.community(BOB) == {}
            assert env.maildir_messages(ANN) == []
            sent = _as_sent(kept[0])
            assert sent.startswith(b"DKIM-Signature:")
            assert b"with ESMTPSA id " in sent
            assert dkim.verify(sent, dnsfunc=_dnsfunc(server))
            assert not dkim.verify(
                sent.replace(b"on Friday", b"on Monday"), dnsfunc=_dnsfunc(server)
            )
            assert sink.rcpts() == ["<Carol@Partner.Example>"]

    with smtp_sink() as sink:
        run(go(sink))


def test_without_a_key_mail_still_goes_out_unsigned(tmp_path: Path) -> None:
    async def go(sink: Sink) -> None:
        async with listeners(tmp_path, sink) as env:
            smtp = await submit_client(env)
            await smtp.login(BOB, BOB_PW)
            await smtp.sendmail(BOB, ["dave@partner.example"], msg(BOB, "dave@partner.example"))
            await smtp_quit(smtp)
            kept = await until("the sink to receive it", sink.messages)
            assert b"DKIM-Signature" not in _as_sent(kept[0])
            assert env.community(BOB) == {"dave@partner.example": "outbound"}

    with smtp_sink() as sink:
        run(go(sink))


def test_a_local_recipient_is_delivered_locally_and_added(tmp_path: Path) -> None:
    async def go(sink: Sink) -> None:
        async with listeners(tmp_path, sink) as env:
            smtp = await submit_client(env)
            await smtp.login(ANN, ANN_PW)
            errors, _ = await smtp.sendmail(
                ANN,
                [BOB, "erin@partner.example", "ann+self@example.test"],
                msg(ANN, BOB, cc="erin@partner.example"),
            )
            assert errors == {}
            # An unknown local user is refused as inbound refuses it.
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as e:
                await smtp.sendmail(ANN, ["nobody@example.test"], msg(ANN, "nobody@example.test"))
            assert e.value.recipients[0].code == 550
            await smtp_quit(smtp)
            mine = await until("bob's copy", lambda: env.maildir_messages(BOB))
            assert b"Shall we meet on Friday?" in mine[0]
            await until("the outside copy", sink.messages)
            assert sink.rcpts() == ["<erin@partner.example>"]
            # Each recipient but Ann herself joins Ann's community.
            assert env.community(ANN) == {BOB: "outbound", "erin@partner.example": "outbound"}
            assert len(await until("ann's own copy", lambda: env.maildir_messages(ANN))) == 1

    with smtp_sink() as sink:
        run(go(sink))


# --- journaling on the inbound listener -----------------------------------------------------


JOURNAL_COPY = (
    b"From: Ann <ann@example.test>\r\n"
    b"To: Frank <frank@partner.example>, bob@example.test\r\n"
    b"Cc: grace@other.example\r\n"
    b"Subject: Quarterly figures\r\n"
    b"\r\n"
    b"Attached.\r\n"
)


async def inbound_send(env: Env, source: str, rcpt: str, data: bytes) -> list[Reply]:
    c, greeting = await Client.connect(env.in_port, source)
    assert greeting is not None and greeting.code == 220, greeting
    replies = [await c.cmd("EHLO exchange.example.test")]
    replies.append(await c.cmd("MAIL FROM:<ann@example.test>"))
    replies.append(await c.cmd(f"RCPT TO:<{rcpt}>"))
    if replies[-1].code == 250:
        assert (await c.cmd("DATA")).code == 354
        await c.send(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        replies.append(await c.reply())
    await c.cmd("QUIT")
    await c.close()
    return replies


def test_a_journal_copy_from_a_trusted_network_teaches_and_is_not_delivered(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        async with listeners(tmp_path) as env:
            replies = await inbound_send(env, "127.0.0.1", "Journal@Example.test", JOURNAL_COPY)
            assert pair(replies[-1]) == (250, "2.0.0")
            assert env.community(ANN) == {
                "frank@partner.example": "journal",
                BOB: "journal",
                "grace@other.example": "journal",
            }
            assert env.community(BOB) == {}
            # A message sent after it reaches Bob alone: the copy never does.
            marker = JOURNAL_COPY.replace(b"Quarterly figures", b"The marker")
            replies = await inbound_send(env, "127.0.0.1", BOB, marker)
            assert pair(replies[-1]) == (250, "2.0.0")
            got = await until("the marker", lambda: env.maildir_messages(BOB))
            assert len(got) == 1 and b"The marker" in got[0]
            assert env.maildir_messages(ANN) == []

    run(go())


def test_the_journal_address_is_unknown_to_outsiders(tmp_path: Path) -> None:
    async def go() -> None:
        async with listeners(tmp_path) as env:
            replies = await inbound_send(env, OUTSIDER, "journal@example.test", JOURNAL_COPY)
            assert pair(replies[-1]) == (550, "5.1.1")
            assert env.community(ANN) == {}

    run(go())


def test_journal_copies_that_are_not_ours_teach_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        async with listeners(tmp_path) as env:
            inbound_copy = JOURNAL_COPY.replace(b"ann@example.test", b"mallory@partner.example")
            report = b"X-MS-Journal-Report:\r\n" + JOURNAL_COPY
            for data in (inbound_copy, report):
                replies = await inbound_send(env, "127.0.0.1", "journal@example.test", data)
                assert pair(replies[-1]) == (250, "2.0.0")
            assert env.community(ANN) == {}

    run(go())


# --- what every submission still gets --------------------------------------------------------


def test_a_virus_is_refused_and_teaches_nothing(tmp_path: Path) -> None:
    async def go(sink: Sink, clamd: Clamd) -> None:
        async with listeners(tmp_path, sink, antivirus={"clamd": clamd.unix}) as env:
            smtp = await submit_client(env)
            await smtp.login(ANN, ANN_PW)
            with pytest.raises(aiosmtplib.SMTPDataError) as e:
                await smtp.sendmail(
                    ANN, ["henry@partner.example"], msg(ANN, "henry@partner.example") + EICAR
                )
            assert e.value.code == 554
            # The same mail, clean, goes: the refusal was the virus.
            await smtp.sendmail(ANN, ["henry@partner.example"], msg(ANN, "henry@partner.example"))
            await smtp_quit(smtp)
            kept = await until("the clean copy", sink.messages)
            assert len(kept) == 1 and EICAR not in kept[0]
            assert env.community(ANN) == {"henry@partner.example": "outbound"}

    with smtp_sink() as sink, clamd_server(tmp_path / "clamd") as clamd:
        run(go(sink, clamd))


def test_size_limit_and_transaction_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kithmail.smtp.transaction")

    async def go() -> None:
        async with listeners(tmp_path, limits={"max_message_size": 2000}) as env:
            smtp = await submit_client(env)
            assert smtp.esmtp_extensions["size"] == "2000"
            await smtp.login(ANN, ANN_PW)
            with pytest.raises(aiosmtplib.SMTPResponseException) as e:
                await smtp.sendmail(ANN, [BOB], msg(ANN, BOB) + b"x" * 3000 + b"\r\n")
            assert (e.value.code, e.value.message[:5]) == (552, "5.3.4")
            await smtp.sendmail(ANN, [BOB], msg(ANN, BOB))
            await smtp_quit(smtp)

    run(go())
    lines = [r.getMessage() for r in caplog.records if r.name == "kithmail.smtp.transaction"]
    accepted = [x for x in lines if "result=accepted" in x]
    assert len(accepted) == 1
    assert "listener=submission" in accepted[0] and f"user={ANN}" in accepted[0]
    assert f"sender={ANN}" in accepted[0] and '"to":"bob@example.test"' in accepted[0]
