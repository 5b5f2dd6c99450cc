"""Inbound SMTP listener: runs the layers and answers each command.

Trusts nothing from the client. Each connection is an aiosmtpd `SMTP`
protocol whose command loop and DATA reader are kithmail's own, so that
every reply carries an enhanced status code, limits answer with their RFC
replies, and DATA ends only at <CRLF>.<CRLF>; aiosmtpd still does the
STARTTLS switch-over and the PROXY protocol parsing.

What a session goes through, in order:
1. Connection limits (overall, per IP, per-IP rate): 421 and hang up.
2. PROXY header, only from `[server] trusted_upstreams` when
   `[server] proxy_protocol` is on; XCLIENT likewise only from them.
3. Pre-greeting: a source Recon has not passed gets "220-" and
   `pregreet_wait` of silence; a client that talks first is a bot that does
   not wait for the server (as Postfix's postscreen finds them): 554 5.5.1.
4. Commands. RCPT runs the relay rules, the one-tenant rule, recipient
   validation (postmaster@ each local domain, and the bare <Postmaster>
   for the first, need no user: RFC 5321 §4.5.1) and layers 1-2
   (`kithmail.pipeline`); DATA is read within
   the size limit and the process-wide memory budget, bare CR/LF refused
   or normalised; end of DATA runs layers 3-4, adds our Received header,
   removes headers only we may write, and answers 250 with the queue id
   only after the spool has the message and every recipient's outcome on
   disk (fsync'd).

Standards: RFC 5321, 3207 (STARTTLS), 1870 (SIZE), 2920 (PIPELINING),
6152 (8BITMIME), 2034 and 3463 (enhanced status codes), 6531 (SMTPUTF8),
7504 (521/556), Postfix's XCLIENT_README, HAProxy's PROXY protocol v1/v2.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import SMTP, TLSSetupException

from kithmail import CoreError, config
from kithmail.layers import Action, Verdict
from kithmail.layers.community import outcome as community_outcome
from kithmail.layers.spoofing.results import AuthResults
from kithmail.metrics import SmtpMetrics
from kithmail.pipeline import MessageContext, Pipeline, rcpt_reply, unknown_recipient
from kithmail.quarantine import reserve_for
from kithmail.sav.tokens import parse_reply_address
from kithmail.smtp import headers as hdr
from kithmail.smtp.addresses import Path, PathError, parse_path, split_params
from kithmail.spool import Envelope, Outcome, Recipient, Spool, SpoolError, SpoolFullError
from kithmail.stats import Stats
from kithmail.tenants import Policies, TenantPolicy

__all__ = ["Gateway", "InboundSession", "RateWindow"]

log = logging.getLogger("kithmail.smtp")
txlog = logging.getLogger("kithmail.smtp.transaction")

UserLookup = Callable[[str], Any]  # folded address → a user or None
CallAhead = Callable[[str], Any]  # address → awaitable "exists" | "unknown" | "tempfail"


class RateWindow:
    """Events per key in fixed one-minute windows, bounded in memory.

    Per process: with several workers each enforces the limit on what it
    sees, so the effective limit is up to `workers` times the setting.
    """

    def __init__(self, limit: int, max_keys: int = 200_000) -> None:
        self.limit = limit
        self.max_keys = max_keys
        self._window = -1
        self._counts: collections.Counter[str] = collections.Counter()

    def hit(self, key: str, now: float) -> bool:
        """Count one event; False when the key is over its limit this minute."""
        w = int(now // 60)
        if w != self._window:
            self._window = w
            self._counts.clear()
        elif len(self._counts) >= self.max_keys and key not in self._counts:
            return True  # under a flood of distinct keys, stop tracking new ones
        self._counts[key] += 1
        return self._counts[key] <= self.limit


class _DataBudget:
    """Bytes of message data held in memory by all sessions of this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


@dataclass(slots=True)
class Gateway:
    """What every session of one process shares."""

    settings: config.Settings
    pipeline: Pipeline
    policies: Policies
    spool: Spool
    find_user: UserLookup
    metrics: SmtpMetrics | None = None
    tls_context: ssl.SSLContext | None = None
    callahead: CallAhead | None = None
    on_accepted: Callable[[str], None] | None = None
    # After a message with a held recipient is on disk: index it in the
    # quarantine and, where safe, challenge its sender.
    on_held: Callable[[str, Envelope, MessageContext], Awaitable[None]] | None = None
    # Asked when a message would only be held (no copy delivered): the held
    # recipients' addresses and the size; a reason answers 452 4.2.2
    # (a quarantine over quota), None accepts.
    may_hold: Callable[[list[str], int], Awaitable[str | None]] | None = None
    # SAV: (token) -> True when it names a valid, unexpired, unused challenge;
    # and, at end of DATA, (token, sender, ctx) -> the verdict of the reply.
    sav_token_ok: Callable[[str], bool] | None = None
    sav_reply: Callable[[str, str, MessageContext], Awaitable[Verdict]] | None = None
    # Journaling (`[submission] journal_address`): at end of DATA, a copy
    # sent to the journal address by a trusted network teaches its sender's
    # community; the verdict says what it taught. The copy is discarded.
    journal: Callable[[MessageContext], Awaitable[Verdict]] | None = None
    clock: Callable[[], float] = time.time
    # The dashboard's per-day counters (`kithmail.stats`), fed where each
    # transaction is logged.
    stats: Stats | None = None
    sessions: int = 0
    per_ip: collections.Counter[str] = field(default_factory=collections.Counter)
    conn_rate: RateWindow = field(init=False)
    ip_msg_rate: RateWindow = field(init=False)
    sender_rate: RateWindow = field(init=False)
    budget: _DataBudget = field(init=False)
    closing: bool = False

    def __post_init__(self) -> None:
        lim = self.settings.limits
        self.conn_rate = RateWindow(lim.connections_per_ip_per_minute)
        self.ip_msg_rate = RateWindow(lim.messages_per_ip_per_minute)
        self.sender_rate = RateWindow(lim.messages_per_sender_per_minute)
        self.budget = _DataBudget(lim.data_memory)

    def factory(self) -> InboundSession:
        return InboundSession(self)


class _NoHooks:
    """aiosmtpd wants a handler; every command is answered by the session."""


@dataclass(slots=True)
class _Rcpt:
    path: Path
    verdicts: list[Verdict]
    sav_token: str | None = None  # a reply to this SAV challenge token
    user: str = ""  # the local user it names (+tag mapped), found once at RCPT
    journal: bool = False  # a journal copy: teaches, never delivered


@dataclass(slots=True)
class _Transaction:
    mail_from: Path
    options: tuple[str, ...]
    utf8: bool
    policy: TenantPolicy | None = None
    rcpts: list[_Rcpt] = field(default_factory=list)
    refused: list[tuple[str, str, str]] = field(default_factory=list)  # (address, reply, reason)
    started: float = field(default_factory=time.monotonic)
    auth: AuthResults = field(default_factory=AuthResults)
    spf: Verdict | None = None  # layer 3's SPF verdict, once per transaction
    spf_done: bool = False


def _kv(**fields: Any) -> str:
    """key=value pairs for one log line; strings JSON-quoted when they need it."""
    out = []
    for k, v in fields.items():
        if v is None:
            continue
        if isinstance(v, str) and (not v or any(c in v for c in ' "=\\') or not v.isprintable()):
            v = json.dumps(v, ensure_ascii=True)
        elif not isinstance(v, str | int | float):
            v = json.dumps(v, ensure_ascii=True, separators=(",", ":"))
        out.append(f"{k}={v}")
    return " ".join(out)


class InboundSession(SMTP):
    """One inbound SMTP connection."""

    def __init__(self, gw: Gateway) -> None:
        s = gw.settings
        lim = s.limits
        # aiosmtpd sizes its StreamReader from this: a line longer than the
        # limit (CRLF and a transparency dot included) is an overrun.
        self.line_length_limit = lim.max_line_length + 1
        super().__init__(
            _NoHooks(),
            data_size_limit=lim.max_message_size,
            enable_SMTPUTF8=True,
            hostname=s.server.hostname,
            ident="ESMTP kithmail",
            tls_context=gw.tls_context,
            timeout=lim.command_timeout,
        )
        self.gw = gw
        self.ip = ""
        self.peer_ip = ""
        self.client_name: str | None = None
        self.helo = ""
        self.esmtp = False
        self.trusted = False
        self.upstream = False
        self.tx: _Transaction | None = None
        self.counted = False
        self.opened = time.monotonic()
        self.bad_commands = 0
        self.command = "CONNECT"

    # ------------------------------------------------------------ plumbing

    async def push(self, status: str) -> None:  # type: ignore[override]
        if status == "220 Ready to start TLS":  # aiosmtpd's words, without RFC 3463's code
            status = "220 2.0.0 Ready to start TLS"
        if self.gw.metrics is not None and status[:3].isdigit():
            self.gw.metrics.reply(self.command, int(status[:3]))
        await super().push(status)

    def _write(self, line: str) -> None:
        """A line written without waiting (the session is about to end)."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(line.encode("utf-8") + b"\r\n")

    def _timeout_cb(self) -> None:
        # RFC 5321 §4.5.3.2: say why before closing.
        if self.transport is not None and not self.transport.is_closing():
            self.command = "TIMEOUT"
            if self.gw.metrics is not None:
                self.gw.metrics.reply("TIMEOUT", 421)
            self._write(f"421 4.4.2 {self.hostname} Error: timeout exceeded")
            self._end_transaction("timeout")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def connection_lost(self, error: Exception | None) -> None:
        if self.counted:
            self.counted = False
            self._uncount()
            self._end_transaction("disconnected")
            if self.gw.metrics is not None:
                self.gw.metrics.sessions.dec()
                self.gw.metrics.session_seconds.observe(time.monotonic() - self.opened)
        super().connection_lost(error)

    def _count(self) -> None:
        self.counted = True
        self.gw.sessions += 1
        self.gw.per_ip[self.peer_ip] += 1
        if self.gw.metrics is not None:
            self.gw.metrics.sessions.inc()

    def _uncount(self) -> None:
        self.gw.sessions -= 1
        self.gw.per_ip[self.peer_ip] -= 1
        if self.gw.per_ip[self.peer_ip] <= 0:
            del self.gw.per_ip[self.peer_ip]

    def _refuse_connection(self, result: str, line: str) -> None:
        if self.gw.metrics is not None:
            self.gw.metrics.connections.labels(result).inc()
            self.gw.metrics.reply("CONNECT", int(line[:3]))
        log.info("refused %s", _kv(client=self.ip or self.peer_ip, why=result))
        self._write(line)
        assert self.transport is not None
        self.transport.close()

    def _set_client(self, ip: str) -> None:
        self.ip = _plain_ip(ip)
        self.trusted = self.gw.pipeline.is_trusted(self.ip)

    # ------------------------------------------------------------ the session

    async def _handle_client(self) -> None:  # replaces aiosmtpd's command loop
        gw = self.gw
        assert self.session is not None and self.transport is not None
        peer = self.session.peer
        self.peer_ip = _plain_ip(peer[0]) if isinstance(peer, tuple) else "127.0.0.1"
        self.upstream = gw.pipeline.is_upstream(self.peer_ip)
        self._set_client(self.peer_ip)
        self._count()
        try:
            await self._serve()
        finally:
            # However the session ended (QUIT, EOF, a reset, a cancelled read
            # when the client hung up -- in the command loop, but also while
            # it was awaited for a PROXY header or sat out the pregreet
            # wait), the connection ends with it: a half-closed socket would
            # keep the session counted until a timeout.
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    async def _serve(self) -> None:
        gw, lim = self.gw, self.gw.settings.limits
        now = gw.clock()
        if gw.closing:
            return self._refuse_connection(
                "shutdown", f"421 4.3.2 {self.hostname} Service shutting down"
            )
        if gw.sessions > lim.max_connections:
            return self._refuse_connection(
                "limit", f"421 4.3.2 {self.hostname} Too many connections, try again later"
            )
        if not self.upstream and not self.trusted:
            if gw.per_ip[self.peer_ip] > lim.max_connections_per_ip:
                return self._refuse_connection(
                    "limit_ip", f"421 4.7.0 {self.hostname} Too many connections from your address"
                )
            if not gw.conn_rate.hit(self.peer_ip, now):
                return self._refuse_connection(
                    "rate",
                    f"421 4.7.0 {self.hostname} Too many connections from your address"
                    " per minute, try again later",
                )
        if self.upstream and gw.settings.server.proxy_protocol:
            self._reset_timeout(10.0)
            proxy = await get_proxy(self._reader)
            src = getattr(proxy, "src_addr", None) if proxy else None
            if not proxy or not proxy.valid:
                return self._refuse_connection("proxy", "421 4.7.0 Bad PROXY header")
            if src is not None:  # a PROXY "LOCAL"/UNKNOWN keeps the upstream's own address
                self._set_client(str(src))
            self._reset_timeout()
        if not await self._pregreet():
            return
        if gw.metrics is not None:
            gw.metrics.connections.labels("served").inc()
        await self.push(f"220 {self.hostname} ESMTP kithmail")
        await self._command_loop()

    async def _pregreet(self) -> bool:
        """postscreen's test: a source not yet passed by Recon must not talk first."""
        wait = self.gw.settings.limits.pregreet_wait
        if wait <= 0 or self.trusted or self.upstream:
            return True
        with _suppress_core_errors():
            r = self.gw.pipeline.core.recon.peek(self.ip, int(self.gw.clock()))
            if r.status in ("known", "exempt"):
                return True
        self._write(f"220-{self.hostname} ESMTP kithmail")
        try:
            early = await asyncio.wait_for(self._reader.read(1), wait)
        except TimeoutError:
            return True
        if not early:  # hung up during the wait
            assert self.transport is not None
            self.transport.close()
            return False
        self._refuse_connection(
            "pregreet", "554 5.5.1 Protocol error: you talked before the greeting"
        )
        return False

    async def _command_loop(self) -> None:
        lim = self.gw.settings.limits
        while self.transport is not None and not self.transport.is_closing():
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as e:
                await self._drain_line(e.consumed)
                self.command = "other"
                await self._bad(
                    f"500 5.5.2 Line too long; the limit is {lim.max_line_length} octets"
                )
                continue
            except asyncio.IncompleteReadError:
                return
            except (ConnectionResetError, asyncio.CancelledError):
                return
            if len(line) > lim.max_line_length:  # RFC 5321 §4.5.3.1: CRLF included
                self.command = "other"
                await self._bad(
                    f"500 5.5.2 Line too long; the limit is {lim.max_line_length} octets"
                )
                continue
            line = line.rstrip(b"\r\n")
            verb, _, arg_bytes = line.partition(b" ")
            try:
                command = verb.decode("ascii").upper()
            except UnicodeDecodeError:
                self.command = "other"
                await self._bad("500 5.5.2 Syntax error: command not recognised")
                continue
            self.command = command
            try:
                arg = arg_bytes.decode("utf-8").strip()
            except UnicodeDecodeError:
                await self._bad("500 5.5.2 Syntax error: invalid UTF-8 in the command")
                continue
            name = _COMMANDS.get(command)
            if name is None:
                await self._bad("500 5.5.2 Syntax error: command not recognised")
                continue
            self._reset_timeout()
            try:
                await getattr(self, name)(arg)
            except (asyncio.CancelledError, ConnectionResetError):
                raise
            except Exception:
                log.exception("session error %s", _kv(client=self.ip, command=command))
                await self.push("451 4.3.0 Local error in processing; try again later")

    async def _drain_line(self, consumed: int, end: bytes = b"\n") -> None:
        """Discard the rest of an over-long line, through its own `end`.

        After an overrun the reader's buffer may stop anywhere in the line;
        what is left of it is still that line, never a line of its own.
        """
        await self._reader.readexactly(consumed)
        while True:
            try:
                await self._reader.readuntil(end)
                return
            except asyncio.LimitOverrunError as e:
                await self._reader.readexactly(e.consumed)

    async def _bad(self, reply: str) -> None:
        """A malformed or unknown command: counted; too many end the session."""
        self.bad_commands += 1
        if self.bad_commands >= self.gw.settings.limits.max_bad_commands:
            await self.push(f"421 4.7.0 {self.hostname} Too many errors, closing the connection")
            assert self.transport is not None
            self.transport.close()
            return
        await self.push(reply)

    # ------------------------------------------------------------ commands

    async def do_helo(self, arg: str, esmtp: bool) -> None:
        if not arg or " " in arg or len(arg) > 255:
            await self._bad(f"501 5.5.4 Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
            return
        self._end_transaction("reset")
        self.helo, self.esmtp = arg, esmtp
        if not esmtp:
            await self.push(f"250 {self.hostname}")
            return
        lines = [self.hostname, *self._extensions()]
        await self.push("\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}")

    def _extensions(self) -> list[str]:
        """The EHLO keywords offered now (after the greeting line)."""
        lines = [
            f"SIZE {self.gw.settings.limits.max_message_size}",
            "PIPELINING",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ]
        if self.tls_context is not None and self._tls_protocol is None:
            lines.append("STARTTLS")
        if self.upstream:
            lines.append("XCLIENT ADDR NAME HELO PROTO")
        return lines

    async def do_ehlo(self, arg: str) -> None:
        await self.do_helo(arg, True)

    async def do_helo_plain(self, arg: str) -> None:
        await self.do_helo(arg, False)

    async def do_starttls(self, arg: str) -> None:
        if arg:
            await self._bad("501 5.5.4 Syntax: STARTTLS")
        elif self.tls_context is None:
            await self.push("454 4.7.0 TLS not available")
        elif self._tls_protocol is not None:
            await self.push("503 5.5.1 TLS already active")
        else:
            self._end_transaction("reset")
            self.helo, self.esmtp = "", False  # RFC 3207 §4.2: forget everything
            try:
                await self.smtp_STARTTLS(arg)
            except TLSSetupException as e:
                # Routine (scanners, old clients): one line, no traceback. The
                # SSL layer tells no protocol of a handshake that failed, so
                # connection_lost would never come: the session ends here, or
                # it would stay counted against the limits for good.
                log.info(
                    "TLS handshake failed %s", _kv(client=self.ip, error=str(e.__cause__)[:200])
                )
                self.connection_lost(e)

    async def do_noop(self, arg: str) -> None:
        await self.push("250 2.0.0 Ok")

    async def do_rset(self, arg: str) -> None:
        self._end_transaction("reset")
        await self.push("250 2.0.0 Ok")

    async def do_quit(self, arg: str) -> None:
        self._end_transaction("quit")
        await self.push(f"221 2.0.0 {self.hostname} Bye")
        assert self.transport is not None
        self.transport.close()

    async def do_vrfy(self, arg: str) -> None:
        await self.push("252 2.5.2 Cannot VRFY user; send mail and it will be tried")

    async def do_expn(self, arg: str) -> None:
        await self.push("502 5.5.1 EXPN not available")

    async def do_help(self, arg: str) -> None:
        await self.push("214 2.0.0 See RFC 5321")

    async def do_auth(self, arg: str) -> None:
        await self.push("503 5.5.1 AUTH is offered on the submission port only")

    async def do_xclient(self, arg: str) -> None:
        if not self.upstream:
            await self._bad("550 5.7.0 XCLIENT not authorized")
            return
        if self.tx is not None:
            await self.push("503 5.5.1 XCLIENT not permitted in a mail transaction")
            return
        attrs: dict[str, str] = {}
        for word in arg.split():
            name, eq, value = word.partition("=")
            name = name.upper()
            if not eq or name not in (
                "ADDR",
                "NAME",
                "HELO",
                "PROTO",
                "PORT",
                "LOGIN",
                "DESTADDR",
                "DESTPORT",
            ):
                await self._bad("501 5.5.4 Bad XCLIENT attribute")
                return
            attrs[name] = _xtext(value)
        addr = attrs.get("ADDR")
        if addr is not None and addr.upper() not in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"):
            try:
                self._set_client(addr.removeprefix("IPV6:").removeprefix("IPv6:"))
            except ValueError:
                await self._bad("501 5.5.4 Bad XCLIENT ADDR")
                return
        rdns = attrs.get("NAME")
        self.client_name = None if rdns is None or rdns.startswith("[") else rdns
        # Postfix's XCLIENT_README: the session starts over with a new greeting.
        self.helo = attrs.get("HELO", "")
        self.esmtp = False
        self.upstream = False  # the client now stands for the real one
        await self.push(f"220 {self.hostname} ESMTP kithmail")

    async def do_mail(self, arg: str) -> None:
        if not self.helo:
            await self.push("503 5.5.1 Say EHLO first")
            return
        if self.tx is not None:
            await self.push("503 5.5.1 Nested MAIL command")
            return
        try:
            path, rest = parse_path(arg, keyword="FROM:", utf8=True, recipient=False)
            params = split_params(rest) if rest else {}
            if params and not self.esmtp:
                raise PathError(555, "5.5.4", "MAIL parameters need EHLO")
            utf8 = "SMTPUTF8" in params
            if utf8 and params["SMTPUTF8"] is not None:
                raise PathError(501, "5.5.4", "SMTPUTF8 takes no value")
            if not utf8 and any(ord(c) > 127 for c in path.address):
                raise PathError(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
            body = (params.get("BODY") or "7BIT").upper()
            if body not in ("7BIT", "8BITMIME"):
                raise PathError(501, "5.5.4", "BODY is 7BIT or 8BITMIME")
            size = params.get("SIZE")
            if size is not None:
                if not size.isdigit() or len(size) > 20:
                    raise PathError(501, "5.5.4", "SIZE is a number of octets")
                if int(size) > self.gw.settings.limits.max_message_size:
                    raise PathError(552, "5.3.4", "Message size exceeds fixed maximum message size")
            unknown = set(params) - {"SMTPUTF8", "BODY", "SIZE"}
            if unknown:
                raise PathError(555, "5.5.4", f"Unsupported MAIL parameter {sorted(unknown)[0]}")
        except PathError as e:
            await self._bad(e.reply)
            return
        refusal = self._check_sender(path, self.gw.clock())
        if refusal is not None:
            await self.push(refusal)
            return
        options = []
        if utf8:
            options.append("SMTPUTF8")
        if body == "8BITMIME":
            options.append("BODY=8BITMIME")
        self.tx = _Transaction(path, tuple(options), utf8)
        await self.push("250 2.1.0 Ok")

    def _check_sender(self, path: Path, now: float) -> str | None:
        """The reply refusing a well-formed MAIL FROM, or None: here, the rates."""
        if not self.trusted:
            if not self.gw.ip_msg_rate.hit(self.ip, now):
                return "451 4.7.1 Too many messages from your address; slow down"
            if path.folded and not self.gw.sender_rate.hit(path.folded, now):
                return "451 4.7.1 Too many messages from this sender; slow down"
        return None

    async def do_rcpt(self, arg: str) -> None:
        tx = self.tx
        if tx is None:
            await self.push("503 5.5.1 Need MAIL first")
            return
        try:
            path, rest = parse_path(arg, keyword="TO:", utf8=tx.utf8, recipient=True)
            if rest:
                split_params(rest)
                raise PathError(555, "5.5.4", "RCPT parameters are not supported")
        except PathError as e:
            tx.refused.append((arg[:100], e.reply, "syntax"))
            await self._bad(e.reply)
            return
        refusal = await self._rcpt(tx, path)
        if refusal is not None:
            reply, reason = refusal
            tx.refused.append((path.address, reply, reason))
            await self.push(reply)
            return
        await self.push("250 2.1.5 Ok")

    async def _rcpt(self, tx: _Transaction, path: Path) -> tuple[str, str] | None:
        """None to accept the recipient, else (the reply refusing it, its reason code)."""
        gw = self.gw
        lim = gw.settings.limits
        if len(tx.rcpts) >= lim.max_recipients:
            return "452 4.5.3 Too many recipients", "limits.recipients"
        if not path.domain:  # the bare <Postmaster>: the gateway's own, its first local domain
            domain = gw.settings.domains.local[0].lower()
            path = dataclasses.replace(
                path, address=f"postmaster@{domain}", folded=f"postmaster@{domain}", domain=domain
            )
        journal = gw.settings.submission.journal_address
        if journal is not None and path.folded == journal:
            # Journal copies come from the organisation's own server, on a
            # trusted network; to anyone else the address does not exist,
            # and says so exactly as an unknown user does.
            if not self.trusted or gw.journal is None:
                self._learn("unknown_recipient", int(gw.clock()))
                return str(unknown_recipient().reply), "recipient.unknown"
            tx.rcpts.append(_Rcpt(path, [], journal=True))
            return None
        policy = None if path.literal else gw.policies.for_domain(path.domain)
        if policy is None:
            if self.trusted:
                tx.rcpts.append(_Rcpt(path, []))  # trusted networks may relay (DESIGN.md)
                return None
            return "554 5.7.1 Relay access denied", "relay.denied"
        if tx.policy is not None and tx.policy.tenant != policy.tenant:
            return (
                "452 4.5.3 Recipients of another organisation go in a separate transaction",
                "tenant.separate",
            )
        # What goes on names the domain judged local (folded: lower case,
        # A-labels), never a look-alike (`ｅxample.test`, which UTS 46 folds
        # to example.test) that the downstream server might not take for its
        # own and relay. The local part stays as given, but for postmaster.
        local = "postmaster" if path.postmaster else path.local
        path = dataclasses.replace(path, address=f"{local}@{path.domain}")
        now = int(gw.clock())
        token = parse_reply_address(path.folded) if gw.sav_token_ok is not None else None
        if token is not None and gw.sav_token_ok is not None and gw.sav_token_ok(token):
            # A reply to one of our challenges (DESIGN.md): accepted before
            # user validation, and Recon is skipped for it.
            verdicts = await gw.pipeline.rcpt(
                policy,
                client_ip=self.ip,
                trusted=self.trusted,
                mail_from=tx.mail_from.folded,
                recipient=path.folded,
                now=now,
                skip_recon=True,
            )
            for v in verdicts:
                if v.acts and v.action in (Action.DEFER, Action.REJECT):
                    return str(rcpt_reply(v)), v.reason
            # SPF too: the reply counts only from an authenticated sender.
            refusal = await self._spf_step(tx, policy)
            if refusal is not None:
                return refusal
            tx.policy = policy
            tx.rcpts.append(_Rcpt(path, verdicts, sav_token=token))
            return None
        # RFC 5321 §4.5.1: postmaster@ every local domain is accepted, a
        # user or not, and goes downstream as addressed. The layers still
        # judge it: a way past them for one well-known address would be
        # the first thing spam tried.
        found = gw.find_user(path.folded)
        if (
            gw.settings.domains.verify_recipients == "users"
            and not path.postmaster
            and found is None
        ):
            self._learn("unknown_recipient", now)
            return str(unknown_recipient().reply), "recipient.unknown"
        verdicts = await gw.pipeline.rcpt(
            policy,
            client_ip=self.ip,
            trusted=self.trusted,
            mail_from=tx.mail_from.folded,
            recipient=path.folded,
            now=now,
        )
        for v in verdicts:
            if v.acts and v.action in (Action.DEFER, Action.REJECT):
                return str(rcpt_reply(v)), v.reason
        refusal = await self._spf_step(tx, policy)
        if refusal is not None:
            return refusal
        if tx.spf is not None:
            verdicts = [*verdicts, tx.spf]
        if gw.settings.domains.verify_recipients == "downstream" and gw.callahead is not None:
            answer = await gw.callahead(path.address)
            if answer == "unknown":
                self._learn("unknown_recipient", now)
                return str(unknown_recipient().reply), "recipient.unknown"
            if answer != "exists":
                return (
                    "451 4.4.3 Cannot verify the recipient now; try again later",
                    "recipient.unverified",
                )
        tx.policy = policy
        tx.rcpts.append(_Rcpt(path, verdicts, user=_user_address(found, path)))
        return None

    async def _spf_step(self, tx: _Transaction, policy: TenantPolicy) -> tuple[str, str] | None:
        """SPF (layer 3) at the first RCPT that layers 1 and 2 let through,
        never before them; once per transaction. Trusted networks are not
        judged by it. The refusal (reply, reason) when it defers or rejects."""
        if not self.trusted and not tx.spf_done:
            tx.spf_done = True
            tx.spf = await self.gw.pipeline.rcpt_spf(
                policy,
                tx.auth,
                client_ip=self.ip,
                helo=self.helo,
                mail_from=tx.mail_from.address,
            )
        if tx.spf is not None and tx.spf.acts and tx.spf.action in (Action.DEFER, Action.REJECT):
            return str(rcpt_reply(tx.spf)), tx.spf.reason
        return None

    def _learn(self, event: str, now: int) -> None:
        if self.trusted:
            return
        with _suppress_core_errors():
            self.gw.pipeline.core.reputation.record(self.ip, event, now)

    async def do_data(self, arg: str) -> None:
        tx = self.tx
        if tx is None or not tx.rcpts:
            await self.push("503 5.5.1 Need RCPT first" if tx else "503 5.5.1 Need MAIL first")
            return
        if arg:
            await self._bad("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._reset_timeout(self.gw.settings.limits.data_timeout)
        lines, problem, taken = await self._read_data()
        try:
            self._reset_timeout()
            if problem is not None:
                self._end_transaction("refused", reply=problem)
                await self.push(problem)
                return
            reply = await self._end_of_data(tx, lines, taken)
            await self.push(reply)
        finally:
            self.gw.budget.give(taken)

    async def _read_data(self) -> tuple[list[bytes], str | None, int]:
        """The message, one line per item (dot-unstuffed, CRLF kept).

        Only <CRLF>.<CRLF> ends it (RFC 5321 §4.1.1.4): a bare CR or LF is
        never a line end here, and neither is a break the reader's buffer
        makes inside an over-long line. Returns (lines, the reply refusing
        the message or None, bytes taken from the memory budget).
        """
        lim = self.gw.settings.limits
        max_size, budget = lim.max_message_size, self.gw.budget
        normalize = lim.bare_newlines == "normalize"
        lines: list[bytes] = []
        size = taken = 0
        problem: str | None = None
        reader = self._reader

        def refuse(reply: str) -> None:
            nonlocal problem, taken
            if problem is None:
                problem = reply
                lines.clear()
                budget.give(taken)
                taken = 0

        try:
            while True:
                try:
                    line = await reader.readuntil(b"\r\n")
                except asyncio.LimitOverrunError as e:
                    await self._drain_line(e.consumed, b"\r\n")
                    line = b""  # too long, and already discarded
                if line == b".\r\n":
                    break
                if line[:1] == b".":
                    line = line[1:]
                # §4.5.3.1.6: 1000 octets with the CRLF, the transparency dot not counted.
                if not line or len(line) > lim.max_line_length:
                    refuse(f"500 5.5.2 Line too long; RFC 5321 allows {lim.max_line_length} octets")
                if problem is not None:
                    continue  # drain to the end of DATA, keep nothing
                body = line[:-2]
                if b"\n" in body or b"\r" in body:
                    if not normalize:
                        refuse(
                            "554 5.6.0 Bare CR or LF in the message; lines must end with CRLF"
                            " (RFC 5321 §2.3.8)"
                        )
                        continue
                    # One item per line, so that the header rules see every
                    # line a downstream reader will see.
                    new = [part + b"\r\n" for part in body.replace(b"\r", b"\n").split(b"\n")]
                else:
                    new = [line]
                n = sum(len(x) for x in new)
                size += n
                if size > max_size:
                    refuse("552 5.3.4 Message size exceeds fixed maximum message size")
                    continue
                if not budget.take(n):
                    refuse("452 4.3.1 Insufficient system resources; try again later")
                    continue
                taken += n
                lines.extend(new)
        except BaseException:
            # A hang-up (aiosmtpd cancels the session at EOF), a timeout, an
            # error: the bytes go back, or the budget would shrink for good
            # with every client that left mid-DATA.
            budget.give(taken)
            raise
        return lines, problem, taken

    async def _end_of_data(self, tx: _Transaction, lines: list[bytes], size: int) -> str:
        gw = self.gw
        assert tx.policy is not None or all(not r.verdicts for r in tx.rcpts)
        policy = tx.policy or TenantPolicy("", gw.settings)
        now = gw.clock()
        end = hdr.split_header(lines)
        head, removed = hdr.strip_ours(lines, end, gw.settings.server.hostname)
        ctx = MessageContext(
            policy,
            self.ip,
            self.helo,
            tx.mail_from.address,
            tuple(r.path.address for r in tx.rcpts),
            tuple(head),
            lines,
            auth=tx.auth,
            local_domains=gw.policies.local_domains,
            trusted=self.trusted,
        )
        verdict = await gw.pipeline.message(ctx)
        reply = verdict.reply
        if reply is not None:
            self._end_transaction("refused", reply=str(reply), verdicts=verdict.verdicts)
            if gw.metrics is not None:
                gw.metrics.messages.labels("deferred" if reply.code < 500 else "rejected").inc()
            return str(reply)
        # Layer 5, per recipient, for the local ones (a trusted network's
        # relayed recipients have no community here).
        local = [
            r
            for r in tx.rcpts
            if gw.policies.is_local(r.path.domain) and r.sav_token is None and not r.journal
        ]
        decided = dict(
            zip(
                (id(r) for r in local),
                gw.pipeline.recipients(ctx, [r.user for r in local]),
                strict=True,
            )
        )
        recipients = []
        tags: list[Verdict] = []
        for r in tx.rcpts:
            vs = [*r.verdicts, *verdict.verdicts]
            outcome = verdict.outcome
            for v in r.verdicts:
                if v.acts and v.action is Action.QUARANTINE:
                    outcome = Outcome.QUARANTINE
            cv = decided.get(id(r))
            if cv is not None:
                vs.append(cv)
                outcome = community_outcome(outcome, cv)
            if r.sav_token is not None and gw.sav_reply is not None:
                # The reply has done its work (or was refused, logged): it is
                # never delivered, and the sender is not bounced.
                vs.append(await gw.sav_reply(r.sav_token, tx.mail_from.address, ctx))
                outcome = Outcome.DISCARD
            if r.journal and gw.journal is not None:
                # Taught before the copy is on disk, as a SAV reply is: a
                # retry after a 4xx teaches the same entries again, harmlessly.
                vs.append(await gw.journal(ctx))
                outcome = Outcome.DISCARD
            tags.extend(v for v in vs if v.action is Action.TAG or v.shadow)
            recipients.append(Recipient(r.path.address, outcome, tuple(vs)))
        envelope = Envelope(
            received=now,
            client_ip=self.ip,
            helo=self.helo,
            mail_from=tx.mail_from.address,
            recipients=tuple(recipients),
            tenant=policy.tenant,
            mail_options=tx.options,
        )
        tls = None
        if self._tls_protocol is not None and self.transport is not None:
            obj = self.transport.get_extra_info("ssl_object")
            if obj is not None:
                tls = f"{obj.version()}:{(obj.cipher() or ('?',))[0]}"
        protocol = ("UTF8SMTP" if tx.utf8 else "ESMTP") if self.esmtp else "SMTP"
        if tls and self.esmtp:
            protocol += "S"
        ours = _auth_header(tx.auth, gw.settings.server.hostname) + _tag_headers(tags)

        def message(queue_id: str) -> list[bytes]:
            trace = hdr.received(
                helo=self.helo,
                client_ip=self.ip,
                client_name=self.client_name,
                hostname=gw.settings.server.hostname,
                protocol=protocol,
                queue_id=queue_id,
                recipients=[r.path.address for r in tx.rcpts],
                tls=tls,
                when=now,
            )
            return [trace, *ours, *head, *lines[end:]]

        outcomes = [r.outcome for r in recipients]
        only_held = Outcome.QUARANTINE in outcomes and Outcome.DELIVER not in outcomes
        # Not with a SAV reply or a journal copy among the recipients: they
        # have done their work already, and a token is single-use.
        if (
            only_held
            and gw.may_hold is not None
            and not any(r.sav_token is not None or r.journal for r in tx.rcpts)
        ):
            held = [r.address for r in recipients if r.outcome is Outcome.QUARANTINE]
            full = await gw.may_hold(held, size)
            if full is not None:
                self._end_transaction("quarantine_full", reply="452 4.2.2")
                if gw.metrics is not None:
                    gw.metrics.messages.labels("deferred").inc()
                return f"452 4.2.2 Mailbox full ({full}); try again later"
        try:
            queue_id = await gw.spool.accept(
                envelope, message, reserve_bytes=reserve_for(outcomes, gw.spool.reserve_bytes)
            )
        except SpoolFullError:
            self._end_transaction("spool_full", reply="452 4.3.1")
            if gw.metrics is not None:
                gw.metrics.messages.labels("deferred").inc()
            return "452 4.3.1 Insufficient system storage; try again later"
        except SpoolError as e:
            log.error("spool error %s", _kv(client=self.ip, error=str(e)))
            self._end_transaction("spool_error", reply="451 4.3.0")
            if gw.metrics is not None:
                gw.metrics.messages.labels("deferred").inc()
            return "451 4.3.0 Local error in processing; try again later"
        if gw.metrics is not None:
            gw.metrics.messages.labels("accepted").inc()
            gw.metrics.message_bytes.observe(size)
            for r in tx.rcpts:
                for v in r.verdicts:
                    if v.reason == "recon.passed" and v.detail.startswith("delayed "):
                        gw.metrics.recon_delay.observe(float(v.detail.split()[1]))
        self._end_transaction(
            "accepted", queue_id=queue_id, size=size, removed=removed, outcomes=envelope
        )
        if gw.on_accepted is not None:
            gw.on_accepted(queue_id)
        if gw.on_held is not None and any(r.outcome is Outcome.QUARANTINE for r in recipients):
            try:
                await gw.on_held(queue_id, envelope, ctx)
            except Exception:
                # The message is on disk and answered for; the quarantine
                # index is reconciled with the spool at the next start.
                log.exception("quarantine index %s", _kv(queue_id=queue_id))
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _log_fields(self) -> dict[str, Any]:
        """More fields for the transaction's log line (the submission's user)."""
        return {}

    def _end_transaction(
        self,
        result: str,
        *,
        reply: str | None = None,
        queue_id: str | None = None,
        size: int | None = None,
        removed: int | None = None,
        verdicts: list[Verdict] | None = None,
        outcomes: Envelope | None = None,
    ) -> None:
        """One structured log line per transaction (ended by DATA, RSET, QUIT or hang-up)."""
        tx, self.tx = self.tx, None
        if tx is None or (
            result in ("reset", "quit", "disconnected") and not (tx.rcpts or tx.refused)
        ):
            return
        rcpts: list[dict[str, Any]] = []
        if outcomes is not None:
            for r in outcomes.recipients:
                rcpts.append(
                    {"to": r.address, "outcome": str(r.outcome), "reasons": list(r.reasons)}
                )
        else:
            for a in tx.rcpts:
                rcpts.append({"to": a.path.address, "outcome": result})
        for addr, why, reason in tx.refused:
            rcpts.append({"to": addr, "reply": why[:80], "reason": reason})
        txlog.info(
            "transaction %s",
            _kv(
                result=result,
                queue_id=queue_id,
                client=self.ip,
                helo=self.helo[:100],
                sender=tx.mail_from.address,
                **self._log_fields(),
                tenant=tx.policy.tenant if tx.policy else None,
                rcpts=rcpts,
                verdicts=[f"{v.reason}{'/shadow' if v.shadow else ''}" for v in verdicts or []]
                or None,
                reply=reply,
                size=size,
                removed_headers=removed or None,
                ms=round((time.monotonic() - tx.started) * 1000, 1),
            ),
        )
        # Inbound mail only: the submission listener names itself in its log fields.
        if self.gw.stats is not None and not self._log_fields():
            self.gw.stats.transaction(
                tenant=tx.policy.tenant if tx.policy else None,
                client=self.ip,
                trusted=self.trusted,
                reply=reply,
                refused=tx.refused,
                rcpt_verdicts=[r.verdicts for r in tx.rcpts if not r.journal],
                message_verdicts=verdicts or (),
                recipients=outcomes.recipients if outcomes is not None else None,
                by_policy=result == "refused",
            )


def _auth_header(auth: AuthResults, authserv_id: str) -> list[bytes]:
    """Our one Authentication-Results field (RFC 8601), its folds checked."""
    value = auth.header(authserv_id)
    parts = value.split("\r\n")
    if any("\r" in p or "\n" in p for p in parts) or any(
        p[:1] not in (" ", "\t") for p in parts[1:]
    ):
        raise ValueError("Authentication-Results value folds badly")
    return [f"Authentication-Results: {value}\r\n".encode()]


def _user_address(found: Any, path: Path) -> str:
    """The local user a recipient names (its +tag mapped), or the folded address."""
    address = getattr(found, "address", None)
    if isinstance(address, str):
        return address
    local, _, domain = path.folded.rpartition("@")
    return f"{local.split('+', 1)[0]}@{domain}"


def _tag_headers(verdicts: list[Verdict]) -> list[bytes]:
    """X-Kithmail-Verdict lines for tags and shadow decisions (reasons are our own codes)."""
    seen: dict[str, None] = {}
    for v in verdicts:
        seen[f"{v.layer}={v.action}{' shadow' if v.shadow else ''}; reason={v.reason}"] = None
    return hdr.header_lines(("X-Kithmail-Verdict", s) for s in seen)


def _xtext(value: str) -> str:
    """RFC 3461 §4 xtext decoding (XCLIENT values use it)."""
    out = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "+" and i + 2 < len(value) + 1:
            try:
                out.append(chr(int(value[i + 1 : i + 3], 16)))
                i += 3
                continue
            except ValueError:
                pass
        out.append(c)
        i += 1
    return "".join(out)


def _plain_ip(ip: str) -> str:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class _suppress_core_errors:
    """A core hiccup (map full, bad input) must not end a session: logged, skipped."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, e: BaseException | None, tb: Any) -> bool:
        if isinstance(e, CoreError):
            log.warning("core: %s", e)
            return True
        return False


# Verb -> the name of its handler, looked up on the session, so that a
# subclass (the submission listener) answers a command by overriding it.
_COMMANDS: dict[str, str] = {
    "EHLO": "do_ehlo",
    "HELO": "do_helo_plain",
    "STARTTLS": "do_starttls",
    "MAIL": "do_mail",
    "RCPT": "do_rcpt",
    "DATA": "do_data",
    "RSET": "do_rset",
    "NOOP": "do_noop",
    "QUIT": "do_quit",
    "VRFY": "do_vrfy",
    "EXPN": "do_expn",
    "HELP": "do_help",
    "AUTH": "do_auth",
    "XCLIENT": "do_xclient",
}
