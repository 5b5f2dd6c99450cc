"""Submission listener: authenticated mail out, which teaches the community.

A `SubmissionSession` is an inbound session (`kithmail.smtp.inbound`) with
other rules. STARTTLS first; AUTH PLAIN or LOGIN only inside TLS; MAIL only
once authenticated, and only from the user's own address (or a ``+tag`` of
it). Any recipient domain is accepted — local recipients must exist, as
inbound — and none of Recon, Reputation or anti-spoofing judges the mail;
the anti-virus layer does (the pipeline's `trusted_message_layers`: a virus
from inside is a virus). At end of DATA the message, with our Received
header, is DKIM-signed by the user's domain when a key exists
(`kithmail.dkimkeys.signer_for`), spooled (every recipient to deliver: the
queue sends non-local ones by `[domains] outbound` and local ones
downstream), and only once it is on disk is each recipient other than the
user added to the user's community (source ``outbound``).

Limits (`[submission]`): failed AUTH attempts per IP and per account per
hour (over either: 421 4.7.0 and hang-up, without checking the password);
messages per user per hour (451 4.7.1). Trusted networks are exempt from
the per-IP failure limit only (a webmail on loopback speaks for many
users); the per-account limit applies to everyone. The windows are fixed
hours per process: up to twice the limit can land across a boundary, and
`workers` processes each count their own.

Journaling (`Submission.journal`, wired into the *inbound* `Gateway`): a
copy an organisation's own server (Exchange, Microsoft 365) sends to
`[submission] journal_address` from a trusted network teaches the community
of its sender — the header From, which must be a local user — every
address in its To, Cc and Bcc fields (source ``journal``). Plain BCC
journaling only: an Exchange envelope journal report (``X-MS-Journal-Report``)
teaches nothing and says so. The inbound session discards the copy.

Trusts: the password check (`Database.verify_password`: argon2, the same
work for an unknown user as for a wrong password); the authenticated user
for the envelope sender only — the header From is the user's business, and
is signed as sent; the trusted networks for journal copies. Nothing else
from the client.

Standards: RFC 6409 (message submission), 4954 (AUTH, 538 before TLS),
3207 (STARTTLS), 4616 (PLAIN), the de-facto LOGIN mechanism
(draft-murchison-sasl-login), 4648 (strict base64), 3848 (ESMTPSA in
Received), 6376 (DKIM).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import email.utils
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

from kithmail import Core
from kithmail.db import Database, InvalidError, User, fold_address
from kithmail.dkimkeys import DkimKeyError, Signer, signer_for
from kithmail.layers import Action, Layer, Verdict
from kithmail.pipeline import MessageContext, unknown_recipient
from kithmail.sav.rules import header_fields
from kithmail.smtp import headers as hdr
from kithmail.smtp.addresses import Path
from kithmail.smtp.inbound import (
    Gateway,
    InboundSession,
    _kv,
    _Rcpt,
    _suppress_core_errors,
    _Transaction,
)
from kithmail.spool import Envelope, Outcome, Recipient, SpoolError, SpoolFullError
from kithmail.tenants import TenantPolicy

__all__ = ["Submission", "SubmissionSession"]

log = logging.getLogger("kithmail.smtp.submission")

# How long a domain's signer (its key, or its absence) is kept before the
# key directory is looked at again: a key made by `kith dkim keygen` is
# used within this time, without a restart.
SIGNER_TTL = 300.0
# At most this many addresses are taught from one journal copy.
JOURNAL_MAX_RECIPIENTS = 1000

_USERNAME = base64.b64encode(b"Username:").decode()  # the LOGIN mechanism's prompts
_PASSWORD = base64.b64encode(b"Password:").decode()


class HourlyCounts:
    """Events per key in fixed one-hour windows, bounded in memory (per process)."""

    def __init__(self, limit: int, max_keys: int = 100_000, period: float = 3600.0) -> None:
        self.limit = limit
        self.max_keys = max_keys
        self.period = period
        self._window = -1
        self._counts: collections.Counter[str] = collections.Counter()

    def _roll(self, now: float) -> None:
        w = int(now // self.period)
        if w != self._window:
            self._window = w
            self._counts.clear()

    def over(self, key: str, now: float) -> bool:
        """True when `key` has reached its limit this window."""
        self._roll(now)
        return self._counts.get(key, 0) >= self.limit

    def hit(self, key: str, now: float) -> bool:
        """Count one event; False when that takes the key over its limit."""
        self._roll(now)
        if self._counts.get(key, 0) >= self.limit:
            return False
        self.add(key, now)
        return True

    def add(self, key: str, now: float) -> bool:
        """Count one event; True when the key is now at or over its limit."""
        self._roll(now)
        if len(self._counts) >= self.max_keys and key not in self._counts:
            # A flood of distinct keys: forget the window rather than grow;
            # the per-IP and per-account limits still catch each next round.
            self._counts.clear()
        self._counts[key] += 1
        return self._counts[key] >= self.limit


@dataclass(slots=True)
class Submission:
    """What the submission sessions of one process share beside the `Gateway`.

    `gateway` is the inbound listener's (settings, pipeline, spool, clock,
    connection counts, `on_accepted`); `database` checks passwords and finds
    users; `core` holds the community; `data_dir` the DKIM keys.
    """

    gateway: Gateway
    database: Database
    core: Core
    data_dir: FsPath
    auth_ip: HourlyCounts = field(init=False)
    auth_account: HourlyCounts = field(init=False)
    user_rate: HourlyCounts = field(init=False)
    _signers: dict[str, tuple[float, Signer]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sub = self.gateway.settings.submission
        self.auth_ip = HourlyCounts(sub.auth_failures_per_ip_per_hour)
        self.auth_account = HourlyCounts(sub.auth_failures_per_account_per_hour)
        self.user_rate = HourlyCounts(sub.messages_per_user_per_hour)

    def factory(self) -> SubmissionSession:
        """The protocol factory for `loop.create_server`."""
        return SubmissionSession(self.gateway, self)

    def signer(self, domain: str) -> Signer:
        """The DKIM signer of `domain` (or `unsigned`), kept for `SIGNER_TTL`."""
        now = time.monotonic()
        kept = self._signers.get(domain)
        if kept is not None and now - kept[0] < SIGNER_TTL:
            return kept[1]
        s = signer_for(self.data_dir, domain)
        self._signers[domain] = (now, s)
        return s

    def teach(self, user: str, entries: Iterable[str], source: str) -> int:
        """Add `entries` to `user`'s community as allowed; how many were new (0 on a core fault)."""
        unique = list(dict.fromkeys(entries))
        if not unique:
            return 0
        now = int(self.gateway.clock())
        with _suppress_core_errors():
            if source == "journal":
                return self.core.community.add_many(user, unique, "allow", "journal", now)
            return self.core.community.add_many(user, unique, "allow", "outbound", now)
        return 0

    async def journal(self, ctx: MessageContext) -> Verdict:
        """A journal copy's recipients join its sender's community (see the module)."""
        fields = header_fields(b"".join(ctx.header) + b"\r\n")

        def done(reason: str, detail: str) -> Verdict:
            log.info("journal %s", _kv(client=ctx.client_ip, reason=reason, detail=detail))
            return Verdict(Layer.COMMUNITY, Action.DISCARD, reason, detail)

        if any(n.strip().lower() == "x-ms-journal-report" for n, _ in fields):
            return done(
                "journal.report_unsupported",
                "an Exchange envelope journal report; use BCC journaling",
            )
        authors = [a for _, a in email.utils.getaddresses(_values(fields, "from")) if a]
        if len(authors) != 1:
            return done("journal.no_sender", f"{len(authors)} From addresses")
        try:
            sender = fold_address(authors[0])
        except InvalidError:
            return done("journal.no_sender", "a From address we cannot read")
        user = self.database.find_user(sender)
        if user is None or user.disabled:
            return done("journal.not_ours", f"From {sender} is not a local user")
        found = email.utils.getaddresses(_values(fields, "to", "cc", "bcc"))
        entries: list[str] = []
        for _, address in found[:JOURNAL_MAX_RECIPIENTS]:
            try:
                folded = fold_address(address)
            except InvalidError:
                continue
            if not owns(user, folded):
                entries.append(folded)
        added = self.teach(user.address, entries, "journal")
        return done(
            "journal.learned",
            f"{len(set(entries))} recipients for {user.address}, {added} new",
        )


def _values(fields: list[tuple[str, str]], *names: str) -> list[str]:
    return [v for n, v in fields if n.strip().lower() in names]


def owns(user: User, folded: str) -> bool:
    """Whether a folded address is the user's own, or a ``+tag`` of it."""
    if folded == user.address:
        return True
    local, _, domain = folded.rpartition("@")
    base = local.split("+", 1)[0]
    return bool(base) and f"{base}@{domain}" == user.address


class _AuthAbort(Exception):
    """An AUTH exchange ended early; `reply` is what to answer (None: the client left)."""

    def __init__(self, reply: str | None) -> None:
        super().__init__(reply or "hang-up")
        self.reply = reply


class SubmissionSession(InboundSession):
    """One submission connection (see the module docstring)."""

    def __init__(self, gw: Gateway, sub: Submission) -> None:
        super().__init__(gw)
        self.sub = sub
        self.user: User | None = None

    # ------------------------------------------------------------ the session

    async def _pregreet(self) -> bool:
        # postscreen's test finds bots on port 25; mail clients here must
        # authenticate anyway, and Recon's state of their address is no matter.
        return True

    def _extensions(self) -> list[str]:
        lines = [x for x in super()._extensions() if not x.startswith("XCLIENT")]
        if self._tls_protocol is not None and self.user is None:
            lines.append("AUTH PLAIN LOGIN")  # RFC 4954 §4: never offered before TLS
        return lines

    async def do_xclient(self, arg: str) -> None:
        await self._bad("502 5.5.1 XCLIENT is not offered on the submission port")

    def _log_fields(self) -> dict[str, Any]:
        return {"listener": "submission", "user": self.user.address if self.user else None}

    # ------------------------------------------------------------ AUTH

    async def do_auth(self, arg: str) -> None:
        if not self.esmtp:
            await self.push("503 5.5.1 Say EHLO first")
            return
        if self._tls_protocol is None:
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if self.user is not None:
            await self.push("503 5.5.1 Already authenticated")
            return
        if self.tx is not None:
            await self.push("503 5.5.1 AUTH not permitted during a mail transaction")
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if mechanism not in ("PLAIN", "LOGIN"):
            await self._bad("504 5.5.4 Unrecognized authentication type; use PLAIN or LOGIN")
            return
        try:
            if mechanism == "PLAIN":
                authzid, account, password = _plain(await self._response(initial or None, ""))
            else:
                authzid = ""
                account = _text(await self._response(initial or None, _USERNAME))
                password = _text(await self._response(None, _PASSWORD))
        except _AuthAbort as e:
            if e.reply is not None:
                await self.push(e.reply)
            return
        await self._verify(authzid, account, password)

    async def _response(self, initial: str | None, challenge: str) -> bytes:
        """One client response, base64-decoded strictly (RFC 4954 §4, RFC 4648 §3.3)."""
        if initial is not None:
            text = initial
            if text == "=":  # RFC 4954 §4: an empty initial response
                return b""
        else:
            await self.push(f"334 {challenge}")
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as e:
                await self._drain_line(e.consumed)
                raise _AuthAbort("500 5.5.6 Authentication exchange line is too long") from None
            except (asyncio.IncompleteReadError, ConnectionResetError):
                raise _AuthAbort(None) from None
            self._reset_timeout()
            try:
                text = line.rstrip(b"\r\n").decode("ascii").strip()
            except UnicodeDecodeError:
                raise _AuthAbort("501 5.5.2 Cannot decode response") from None
        if text == "*":
            raise _AuthAbort("501 5.0.0 Authentication cancelled")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _AuthAbort("501 5.5.2 Cannot decode response") from None

    async def _verify(self, authzid: str, account: str, password: str) -> None:
        sub, now = self.sub, self.gw.clock()
        key = account.strip().lower()[:320]
        limit_ip = not self.trusted
        if (limit_ip and sub.auth_ip.over(self.ip, now)) or sub.auth_account.over(key, now):
            await self._too_many(account)
            return
        user = await asyncio.to_thread(sub.database.verify_password, account, password)
        # RFC 4616 §2: an authorization identity other than the account's own
        # is refused (no one here may act for another).
        if user is not None and authzid:
            try:
                if fold_address(authzid) != user.address:
                    user = None
            except InvalidError:
                user = None
        if user is None:
            over_ip = limit_ip and sub.auth_ip.add(self.ip, now)
            over_account = sub.auth_account.add(key, now)
            log.info("auth failed %s", _kv(client=self.ip, account=key[:100]))
            if over_ip or over_account:
                await self._too_many(account)
                return
            await self.push("535 5.7.8 Authentication credentials invalid")
            return
        self.user = user
        log.info("auth ok %s", _kv(client=self.ip, user=user.address))
        await self.push("235 2.7.0 Authentication successful")

    async def _too_many(self, account: str) -> None:
        log.warning(
            "auth refused: too many failures %s",
            _kv(client=self.ip, account=account.strip().lower()[:100]),
        )
        await self.push("421 4.7.0 Too many failed authentication attempts; try again later")
        assert self.transport is not None
        self.transport.close()

    # ------------------------------------------------------------ the transaction

    async def do_mail(self, arg: str) -> None:
        if self.user is None:
            await self.push("530 5.7.0 Authentication required")
            return
        await super().do_mail(arg)

    def _check_sender(self, path: Path, now: float) -> str | None:
        user = self.user
        assert user is not None
        if path.null:
            return "553 5.7.1 The null sender is not accepted for submission"
        if not owns(user, path.folded):
            return "553 5.7.1 Sender address not owned by you"
        if not self.sub.user_rate.hit(user.address, now):
            log.warning("submission rate %s", _kv(client=self.ip, user=user.address))
            return "451 4.7.1 Too many messages from your account; try again later"
        return None

    async def _rcpt(self, tx: _Transaction, path: Path) -> tuple[str, str] | None:
        gw = self.gw
        if len(tx.rcpts) >= gw.settings.limits.max_recipients:
            return "452 4.5.3 Too many recipients", "limits.recipients"
        if not path.domain:  # the bare <Postmaster>: the gateway's own
            domain = gw.settings.domains.local[0].lower()
            path = dataclasses.replace(
                path, address=f"postmaster@{domain}", folded=f"postmaster@{domain}", domain=domain
            )
        if path.literal:
            # DESIGN.md: address literals never turn into relaying.
            return "550 5.7.1 Address literals are not accepted here", "relay.literal"
        if gw.policies.is_local(path.domain):
            local = "postmaster" if path.postmaster else path.local
            path = dataclasses.replace(path, address=f"{local}@{path.domain}")
            if (
                gw.settings.domains.verify_recipients == "users"
                and not path.postmaster
                and gw.find_user(path.folded) is None
            ):
                return str(unknown_recipient().reply), "recipient.unknown"
            if gw.settings.domains.verify_recipients == "downstream" and gw.callahead is not None:
                answer = await gw.callahead(path.address)
                if answer == "unknown":
                    return str(unknown_recipient().reply), "recipient.unknown"
                if answer != "exists":
                    return (
                        "451 4.4.3 Cannot verify the recipient now; try again later",
                        "recipient.unverified",
                    )
        tx.rcpts.append(_Rcpt(path, []))
        return None

    async def _end_of_data(self, tx: _Transaction, lines: list[bytes], size: int) -> str:
        gw, sub, user = self.gw, self.sub, self.user
        assert user is not None
        policy = gw.policies.for_domain(user.domain) or TenantPolicy(user.tenant, gw.settings)
        tx.policy = policy
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
            trusted=True,  # authenticated: only the trusted layers (anti-virus) judge it
        )
        verdict = await gw.pipeline.message(ctx)
        reply = verdict.reply
        if reply is None and verdict.outcome is not Outcome.DELIVER:
            # A hold is for mail coming in; the sender of mail going out is
            # told at once instead, and nothing is sent.
            d = verdict.decisive
            reply = None if d is None else d.reply
            reply_text = str(reply) if reply is not None else "554 5.7.1 Message refused by policy"
        else:
            reply_text = str(reply) if reply is not None else ""
        if reply_text:
            self._end_transaction("refused", reply=reply_text, verdicts=verdict.verdicts)
            if gw.metrics is not None:
                gw.metrics.messages.labels("deferred" if reply_text[0] == "4" else "rejected").inc()
            return reply_text
        recipients = tuple(
            Recipient(r.path.address, Outcome.DELIVER, tuple(verdict.verdicts)) for r in tx.rcpts
        )
        envelope = Envelope(
            received=now,
            client_ip=self.ip,
            helo=self.helo,
            mail_from=tx.mail_from.address,
            recipients=recipients,
            tenant=user.tenant,
            mail_options=tx.options,
        )
        tls = None
        if self._tls_protocol is not None and self.transport is not None:
            obj = self.transport.get_extra_info("ssl_object")
            if obj is not None:
                tls = f"{obj.version()}:{(obj.cipher() or ('?',))[0]}"
        # RFC 3848 (and RFC 6531 §3.7.4): S for TLS, A for authenticated.
        protocol = "UTF8SMTPSA" if tx.utf8 else "ESMTPSA"
        try:
            sign = await asyncio.to_thread(sub.signer, user.domain)
        except DkimKeyError as e:
            log.error("dkim %s", _kv(user=user.address, error=str(e)))
            self._end_transaction("dkim_error", reply="451 4.3.0")
            return "451 4.3.0 Local error in processing; try again later"

        def message(queue_id: str) -> Any:
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

            async def signed() -> Any:
                # Signed whole, our Received header included (RFC 6376 §5.4:
                # the signer signs what it sends); RSA and the body hash of a
                # large message run off the event loop.
                raw = b"".join([trace, *head, *lines[end:]])
                yield await asyncio.to_thread(sign, raw)

            return signed()

        try:
            queue_id = await gw.spool.accept(envelope, message)
        except SpoolFullError:
            self._end_transaction("spool_full", reply="452 4.3.1")
            return "452 4.3.1 Insufficient system storage; try again later"
        except SpoolError as e:
            log.error("spool error %s", _kv(client=self.ip, error=str(e)))
            self._end_transaction("spool_error", reply="451 4.3.0")
            return "451 4.3.0 Local error in processing; try again later"
        except DkimKeyError as e:
            log.error("dkim %s", _kv(user=user.address, error=str(e)))
            self._end_transaction("dkim_error", reply="451 4.3.0")
            return "451 4.3.0 Local error in processing; try again later"
        # On disk: now the recipients join the community (DESIGN.md: only
        # authenticated submission teaches it). A fault here is logged; the
        # message is accepted either way.
        entries = [r.path.folded for r in tx.rcpts if not owns(user, r.path.folded)]
        added = sub.teach(user.address, entries, "outbound")
        if gw.metrics is not None:
            gw.metrics.messages.labels("accepted").inc()
            gw.metrics.message_bytes.observe(size)
        self._end_transaction(
            "accepted", queue_id=queue_id, size=size, removed=removed, outcomes=envelope
        )
        log.info(
            "community %s",
            _kv(user=user.address, queue_id=queue_id, taught=len(entries), new=added),
        )
        if gw.on_accepted is not None:
            gw.on_accepted(queue_id)
        return f"250 2.0.0 Ok: queued as {queue_id}"


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _AuthAbort("501 5.5.2 Cannot decode response") from None


def _plain(raw: bytes) -> tuple[str, str, str]:
    """RFC 4616 §2: ``[authzid] NUL authcid NUL passwd``, UTF-8, no NUL inside."""
    parts = raw.split(b"\0")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise _AuthAbort("501 5.5.2 Malformed PLAIN response")
    authzid, account, password = (_text(p) for p in parts)
    return authzid, account, password
