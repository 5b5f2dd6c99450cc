"""Sender Address Verification: one challenge to an unknown sender, confirmed by reply or page.

When the community layer holds a message from a sender the recipient does
not know, it asks `Sav.challenge` (or `should_challenge` then
`send_challenge`). A challenge goes only where it cannot be backscatter:
to an authenticated sender (SPF pass for the envelope sender, or a DKIM
signature aligned with it), never to the null sender, never for list, bulk
or automatic mail, never to one of our own domains, at most once per
(user, sender) per ``[community] challenge_interval``, and within
``challenge_rate_per_domain`` (per sender domain) and
``challenge_rate_global`` per hour. Every refusal is one reason code
(``sav.null_sender``, ``sav.bulk``, ``sav.own_domain``,
``sav.unauthenticated``, ``sav.interval``, ``sav.rate_domain``,
``sav.rate_global``; also ``sav.disabled`` and ``sav.bad_sender``) and
one ``suppressed`` row of the ``challenges`` table, so a user can be told
why no challenge left. A challenge is spooled with the null envelope
sender to the sender (Outcome.DELIVER: the queue's outbound path, with
retries) and recorded as a ``sent`` row; the rate limits count those.

The sender confirms by replying to ``sav+<token>@<recipient's domain>``
(`verify_reply`, then `confirm`) or by the page ``<public_url>/sav/<token>``
(`kithmail.public`, which calls `check` and `confirm`). `confirm` turns the
row from ``sent`` to ``verified`` in one conditional UPDATE, so a token
confirms once however many replies and clicks race; it then awaits the
caller's ``on_verified(tenant, user, sender)`` — where the community entry
(source ``sav``) is added and the sender's held mail released, by the
modules that own those — and, if that raises, turns the row back to
``sent`` so that a retry can succeed: the effect happens at least once and
the token is spent only when it did.

Trusts nothing it is given: a token is checked for shape, MAC (constant
time), expiry and state, and a forged, expired or replayed one is logged
and refused with its reason; sender addresses are folded
(`kithmail.db.fold_address`) before any comparison or storage. The key is
`tokens.load_key`'s. Owns the ``challenges`` table (schema in
`kithmail.db`); reads the ``quarantine`` index only to show a held subject.
Database writes block: the async methods run them in a thread, and the
sync ones are for a thread (or the CLI).

Standards: RFC 3834 (automatic responses: when not to send, null sender,
Auto-Submitted), RFC 5321 §4.5.5 (the null reverse-path), RFC 7208 and
RFC 6376 / RFC 7489 §3.1 (what authenticates a sender), RFC 5322, RFC 2047.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, cast

from kithmail import config, metrics
from kithmail.db import Database, InvalidError, fold_address, fold_domain
from kithmail.dkimkeys import Signer, signer_for, unsigned
from kithmail.layers.spoofing.own import own_domain
from kithmail.layers.spoofing.results import AuthResults
from kithmail.sav import message as _message
from kithmail.sav.rules import Headers, authenticated, automatic, field, header_fields
from kithmail.sav.tokens import (
    LOCAL_PART,
    TokenData,
    decode,
    load_key,
    mac,
    make_token,
    new_nonce,
    parse_reply_address,
    reply_address,
)
from kithmail.spool import Envelope, Outcome, QueueId, Recipient, Spool

__all__ = [
    "LOCAL_PART",
    "REASONS",
    "OnVerified",
    "Sav",
    "TokenData",
    "header_fields",
    "parse_reply_address",
    "reply_address",
]

log = logging.getLogger("kithmail.sav")

OnVerified = Callable[[str, str, str], Awaitable[None]]  # (tenant, user, sender)
Read = Callable[[str, Sequence[object]], list[tuple[object, ...]]]

HOUR: Final = 3600.0
# Why no challenge was sent (the `why` of a suppressed row).
REASONS: Final = frozenset(
    {
        "sav.disabled",
        "sav.null_sender",
        "sav.bad_sender",
        "sav.bulk",
        "sav.own_domain",
        "sav.unauthenticated",
        "sav.interval",
        "sav.rate_domain",
        "sav.rate_global",
    }
)
# States that mean a challenge left (the limits count these).
_SENT = ("sent", "verified")


@dataclass(frozen=True, slots=True)
class _Row:
    tenant: str
    user: str
    sender: str
    queue_id: str
    expires_at: int
    state: str


def _printable(s: str, limit: int = 200) -> str:
    """For log lines: a client's string can neither break a line nor drive a terminal."""
    return "".join(c if c.isprintable() else "?" for c in s[:limit])


class Sav:
    """Challenges of one gateway: its key, its database, its settings, its clock."""

    def __init__(
        self,
        db: Database,
        settings: config.Settings,
        *,
        clock: Callable[[], float] = time.time,
        key: bytes | None = None,
    ) -> None:
        """``key`` defaults to `tokens.load_key` of ``[server] data_dir`` (made at first use)."""
        self.db = db
        self.settings = settings
        self._clock = clock
        self._key = key if key is not None else load_key(settings.server.data_dir)
        self._signers: dict[str, Signer] = {}
        # A tenant's settings with its overrides (`Policies.for_tenant`):
        # whether to challenge and how often follow the tenant's [community];
        # None: `settings` for every tenant.
        self.settings_for: Callable[[str], config.Settings] | None = None

    def _community(self, tenant: str) -> config.Community:
        if self.settings_for is not None and tenant:
            return self.settings_for(tenant).community
        return self.settings.community

    # --- tokens ---

    def make_token(
        self, tenant: str, user: str, sender: str, queue_id: str, expires: int, nonce: str
    ) -> str:
        """The token of a challenge (see `tokens`): 48 characters of ``a-z2-7``."""
        return make_token(self._key, tenant, user, sender, queue_id, expires, nonce)

    def page_tag(self, token: str) -> str:
        """The confirmation page's form field for ``token``: only a page we rendered holds it."""
        msg = b"kithmail-sav-page\0" + token.encode("ascii", "replace")
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def check(self, token: str, *, now: float | None = None) -> TokenData | str:
        """The challenge a token names, if it may still confirm; else why not.

        Reasons: ``sav.token_malformed`` (not a token), ``sav.token_unknown``
        (no such challenge: forged, or swept), ``sav.token_forged`` (the MAC
        does not verify), ``sav.token_used`` (confirmed already),
        ``sav.token_expired``. Changes nothing; reads one row by its key.
        """
        when = self._clock() if now is None else now
        parts = decode(token)
        if parts is None:
            return "sav.token_malformed"
        rows = self.db.read(
            "SELECT tenant, user, sender, queue_id, expires_at, state FROM challenges"
            " WHERE nonce = ?",
            (parts.nonce,),
        )
        if not rows:
            return "sav.token_unknown"
        row = _Row(*cast(tuple[str, str, str, str, int, str], rows[0]))
        if row.state == "suppressed":
            return "sav.token_unknown"  # no token was ever issued for it
        expected = mac(
            self._key, row.tenant, row.user, row.sender, row.queue_id, parts.expires, parts.nonce
        )
        # Both checks always run, so the time taken tells nothing about which failed.
        mac_ok = hmac.compare_digest(expected, parts.mac)
        if not mac_ok or parts.expires != row.expires_at:
            return "sav.token_forged"
        if row.state == "verified":
            return "sav.token_used"
        if row.state == "expired" or when >= row.expires_at:
            return "sav.token_expired"
        return TokenData(
            tenant=row.tenant,
            user=row.user,
            sender=row.sender,
            queue_id=row.queue_id,
            expires=row.expires_at,
            nonce=parts.nonce,
        )

    def check_token(self, token: str, *, now: float | None = None) -> TokenData | None:
        """`check`, with None for any refusal (logged with its reason)."""
        got = self.check(token, now=now)
        if isinstance(got, str):
            log.warning("SAV token refused: %s (%s)", got, _printable(token, 60))
            return None
        return got

    # --- whether to challenge ---

    def should_challenge(
        self,
        *,
        tenant: str,
        user: str,
        sender: str,
        queue_id: str,
        headers: Headers,
        auth: AuthResults,
        now: float | None = None,
    ) -> tuple[bool, str]:
        """Whether a challenge about the held ``queue_id`` may go to ``sender``; and the reason.

        (True, "sav.challenge") or (False, one of `REASONS`); each refusal
        is written as a ``suppressed`` row. ``headers`` are the held
        message's header fields (`header_fields`); ``auth`` what layer 3
        found. Blocks on a database write: call it in a thread, or use
        `challenge`.
        """
        when = self._clock() if now is None else now
        folded_sender, domain, reason = self._precheck(sender, headers, auth, tenant)
        if reason is None:
            reason = self._limit(folded_sender, domain, user, when, tenant=tenant)
        if reason is not None:
            with self.db.write() as conn:
                self._suppress(conn, tenant, user, folded_sender, domain, queue_id, when, reason)
            return False, reason
        return True, "sav.challenge"

    def _precheck(
        self, sender: str, headers: Headers, auth: AuthResults, tenant: str = ""
    ) -> tuple[str, str, str | None]:
        """(folded sender, its domain, the first rule that refuses or None): no database."""
        if not self._community(tenant).sav:
            return sender, "", "sav.disabled"
        if not sender:
            return "", "", "sav.null_sender"
        try:
            folded = fold_address(sender)
        except InvalidError:
            return sender[:320], "", "sav.bad_sender"
        domain = folded.rpartition("@")[2]
        if not folded.isascii():
            return folded, domain, "sav.bad_sender"  # see message.compose
        if automatic(headers) is not None:
            return folded, domain, "sav.bulk"
        if self._ours(domain):
            return folded, domain, "sav.own_domain"
        if authenticated(folded, auth) is None:
            return folded, domain, "sav.unauthenticated"
        return folded, domain, None

    def _ours(self, domain: str) -> bool:
        if own_domain(domain, self.settings.domains.local) is not None:
            return True
        return self.db.tenant_of(domain) is not None

    def _limit(
        self,
        sender: str,
        domain: str,
        user: str,
        now: float,
        conn: sqlite3.Connection | None = None,
        *,
        tenant: str = "",
    ) -> str | None:
        """The interval and rate rules, counted from the table; None when they allow one more."""
        c = self._community(tenant)
        read: Read = self.db.read if conn is None else _reader(conn)
        since = now - c.challenge_interval
        if read(
            "SELECT 1 FROM challenges WHERE user = ? AND sender = ? AND sent_at > ?"
            " AND state IN ('sent', 'verified') LIMIT 1",
            (user, sender, since),
        ):
            return "sav.interval"
        hour = now - HOUR
        n = read(
            "SELECT count(*) FROM challenges WHERE domain = ? AND sent_at > ?"
            " AND state IN ('sent', 'verified')",
            (domain, hour),
        )
        if cast(int, n[0][0]) >= c.challenge_rate_per_domain:
            return "sav.rate_domain"
        n = read(
            "SELECT count(*) FROM challenges WHERE sent_at > ? AND state IN ('sent', 'verified')",
            (hour,),
        )
        if cast(int, n[0][0]) >= c.challenge_rate_global:
            return "sav.rate_global"
        return None

    def _suppress(
        self,
        conn: sqlite3.Connection,
        tenant: str,
        user: str,
        sender: str,
        domain: str,
        queue_id: str,
        now: float,
        reason: str,
    ) -> None:
        conn.execute(
            "INSERT INTO challenges (tenant, user, sender, domain, queue_id, nonce, sent_at,"
            " expires_at, state, why) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'suppressed', ?)",
            (tenant, user, sender, domain, queue_id, new_nonce(), int(now), int(now), reason),
        )
        _note(conn, queue_id, user, reason)
        metrics.sav_suppressed(reason, REASONS)
        log.info(
            "no SAV challenge to <%s> for %s about %s: %s",
            _printable(sender),
            user,
            queue_id,
            reason,
        )

    # --- composing and sending ---

    def signer(self, domain: str) -> Signer:
        """The DKIM signer of one of our domains (`dkimkeys.signer_for`, ``[dkim] selector``).

        Falls back to the newest key of the domain when the configured
        selector has none; kept per domain once a key was found.
        """
        if (s := self._signers.get(domain)) is not None:
            return s
        data_dir = self.settings.server.data_dir
        path = data_dir / "dkim" / f"{domain}.{self.settings.dkim.selector}.pem"
        s = signer_for(data_dir, domain, self.settings.dkim.selector if path.is_file() else None)
        if s is not unsigned:
            self._signers[domain] = s
        return s

    def compose(
        self,
        *,
        token: str,
        user: str,
        sender: str,
        subject: str,
        now: float,
        sender_name: str = "",
        held_message_id: str = "",
    ) -> bytes:
        """The challenge (`message.compose`) from this gateway's settings, DKIM-signed."""
        domain = fold_domain(user.rpartition("@")[2])
        return _message.compose(
            recipient=user,
            sender=sender,
            subject=subject,
            token=token,
            public_url=self.settings.server.public_url,
            now=now,
            sender_name=sender_name,
            held_message_id=held_message_id,
            from_local=self.settings.community.challenge_from,
            signer=self.signer(domain),
        )

    async def send_challenge(
        self,
        spool: Spool,
        *,
        tenant: str,
        user: str,
        sender: str,
        queue_id: str,
        subject: str = "",
        sender_name: str = "",
        held_message_id: str = "",
        now: float | None = None,
    ) -> QueueId | None:
        """Record a ``sent`` row and spool the challenge; the challenge's queue id.

        Call after `should_challenge` said yes. The interval and rate rules
        are checked again in the same write transaction that records the
        row, so two messages decided at once cannot both send: the loser is
        recorded ``suppressed`` and None is returned. If composing or
        spooling fails, the row is removed (it never counted) and the error
        raised. The challenge has the null envelope sender and goes to
        ``sender`` with Outcome.DELIVER. ``subject``, ``sender_name`` and
        ``held_message_id`` are the held message's, as received.
        """
        sent, _ = await self._send(
            spool,
            tenant=tenant,
            user=user,
            sender=sender,
            queue_id=queue_id,
            subject=subject,
            sender_name=sender_name,
            held_message_id=held_message_id,
            now=self._clock() if now is None else now,
        )
        return sent

    async def _send(
        self,
        spool: Spool,
        *,
        tenant: str,
        user: str,
        sender: str,
        queue_id: str,
        subject: str,
        sender_name: str,
        held_message_id: str,
        now: float,
    ) -> tuple[QueueId | None, str]:
        when = now
        folded = fold_address(sender)
        domain = folded.rpartition("@")[2]
        expires = int(when + self.settings.community.token_ttl)
        nonce = new_nonce()

        def record() -> str | None:
            with self.db.write() as conn:
                reason = self._limit(folded, domain, user, when, conn, tenant=tenant)
                if reason is not None:
                    self._suppress(conn, tenant, user, folded, domain, queue_id, when, reason)
                    return reason
                conn.execute(
                    "INSERT INTO challenges (tenant, user, sender, domain, queue_id, nonce,"
                    " sent_at, expires_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'sent')",
                    (tenant, user, folded, domain, queue_id, nonce, int(when), expires),
                )
                _note(conn, queue_id, user, "sav.challenge")
            return None

        if (refused := await asyncio.to_thread(record)) is not None:
            return None, refused
        token = self.make_token(tenant, user, folded, queue_id, expires, nonce)
        try:
            data = await asyncio.to_thread(
                self.compose,
                token=token,
                user=user,
                sender=folded,
                subject=subject,
                now=when,
                sender_name=sender_name,
                held_message_id=held_message_id,
            )
            envelope = Envelope(
                received=when,
                client_ip="",  # made here
                helo=self.settings.server.hostname,
                mail_from="",  # RFC 3834 §3.3: a challenge to a forged address bounces nowhere
                recipients=(Recipient(folded, Outcome.DELIVER),),
                tenant=tenant,
                mail_options=(),  # 7-bit: QP parts, encoded words, ASCII addresses
            )
            challenge_id = await spool.accept(envelope, data)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self._forget, nonce))
            raise
        metrics.sav_challenge("sent")
        log.info("SAV challenge %s to <%s> for %s about %s", challenge_id, folded, user, queue_id)
        return challenge_id, "sav.challenge"

    def _forget(self, nonce: str) -> None:
        with self.db.write() as conn:
            row = conn.execute(
                "DELETE FROM challenges WHERE nonce = ? AND state = 'sent' RETURNING queue_id, user",
                (nonce,),
            ).fetchone()
            if row is not None:
                _note(conn, row[0], row[1], "")

    async def challenge(
        self,
        spool: Spool,
        *,
        tenant: str,
        user: str,
        sender: str,
        queue_id: str,
        headers: Headers,
        auth: AuthResults,
        now: float | None = None,
    ) -> tuple[QueueId | None, str]:
        """`should_challenge`, then `send_challenge` when it may: (challenge id or None, reason).

        Subject, the From display name and Message-ID are read from
        ``headers``; the display name is used only when the From address is
        the envelope sender.
        """
        when = self._clock() if now is None else now
        ok, reason = await asyncio.to_thread(
            lambda: self.should_challenge(
                tenant=tenant,
                user=user,
                sender=sender,
                queue_id=queue_id,
                headers=headers,
                auth=auth,
                now=when,
            )
        )
        if not ok:
            return None, reason
        return await self._send(
            spool,
            tenant=tenant,
            user=user,
            sender=sender,
            queue_id=queue_id,
            subject=field(headers, "subject"),
            sender_name=_display_name(field(headers, "from"), sender),
            held_message_id=field(headers, "message-id"),
            now=when,
        )

    # --- verification ---

    def verify_reply(
        self,
        token: str,
        sender: str,
        auth: AuthResults,
        headers: Headers,
        *,
        now: float | None = None,
    ) -> tuple[TokenData | None, str]:
        """Whether a message to ``sav+<token>@…`` confirms its challenge: (data, "sav.verified") or (None, why).

        It counts only when it is not itself automatic (``sav.reply_null_sender``,
        ``sav.reply_automatic``: Auto-Submitted other than ``no``, a DSN or
        other multipart/report, an out-of-office, list or bulk mail), its
        token is valid, unexpired and unused (`check`'s reasons), it comes
        from the challenged sender (``sav.reply_wrong_sender``) and that
        sender is authenticated (``sav.reply_unauthenticated``). Nothing is
        changed: `confirm` spends the token. Every refusal is logged.
        """
        reason: str
        data: TokenData | None = None
        if not sender:
            reason = "sav.reply_null_sender"
        elif automatic(headers) is not None:
            reason = "sav.reply_automatic"
        else:
            got = self.check(token, now=now)
            if isinstance(got, str):
                reason = got
            else:
                try:
                    folded = fold_address(sender)
                except InvalidError:
                    folded = ""
                if folded != got.sender:
                    reason = "sav.reply_wrong_sender"
                elif authenticated(folded, auth) is None:
                    reason = "sav.reply_unauthenticated"
                else:
                    reason, data = "sav.verified", got
        if data is None:
            log.warning(
                "SAV reply from <%s> to token %s does not count: %s",
                _printable(sender),
                _printable(token, 60),
                reason,
            )
        return data, reason

    async def confirm(
        self,
        data: TokenData,
        on_verified: OnVerified | None = None,
        *,
        via: str = "reply",
        now: float | None = None,
    ) -> bool:
        """Spend the token and run ``on_verified(tenant, user, sender)``; False if already spent.

        The row goes ``sent`` → ``verified`` only if it is still ``sent``
        and unexpired (one UPDATE: of racing confirmations, one wins). If
        ``on_verified`` raises, the row goes back to ``sent`` and the error
        is raised, so the sender can try again. ``via`` ("reply" or "page")
        goes into the audit log.
        """
        when = self._clock() if now is None else now

        def claim() -> bool:
            with self.db.write() as conn:
                n = conn.execute(
                    "UPDATE challenges SET state = 'verified', why = ?"
                    " WHERE nonce = ? AND state = 'sent' AND expires_at > ?",
                    (f"sav.verified.{via}", data.nonce, int(when)),
                ).rowcount
                if n == 1:
                    _note(conn, data.queue_id, data.user, "sav.verified")
            return n == 1

        if not await asyncio.to_thread(claim):
            log.warning("SAV token for <%s> (%s) already spent or expired", data.sender, data.user)
            return False
        if on_verified is not None:
            try:
                await on_verified(data.tenant, data.user, data.sender)
            except BaseException:
                await asyncio.shield(asyncio.to_thread(self._unclaim, data))
                raise
        await asyncio.to_thread(
            self.db.audit,
            f"sav:{data.sender}",
            "sav.verified",
            tenant=data.tenant,
            target=data.user,
            detail=f"via {via}; held {data.queue_id}",
        )
        metrics.sav_challenge("verified")
        log.info("SAV: <%s> confirmed for %s via %s", data.sender, data.user, via)
        return True

    def _unclaim(self, data: TokenData) -> None:
        with self.db.write() as conn:
            n = conn.execute(
                "UPDATE challenges SET state = 'sent', why = ''"
                " WHERE nonce = ? AND state = 'verified'",
                (data.nonce,),
            ).rowcount
            if n == 1:
                _note(conn, data.queue_id, data.user, "sav.challenge")

    # --- for the page and for housekeeping ---

    def held_subject(self, data: TokenData) -> str:
        """The held message's subject as the quarantine index has it ("" when not indexed)."""
        rows = self.db.read(
            "SELECT subject FROM quarantine WHERE queue_id = ? AND user = ? LIMIT 1",
            (data.queue_id, data.user),
        )
        return cast(str, rows[0][0]) if rows else ""

    def sweep(self, *, now: float | None = None) -> tuple[int, int]:
        """Expire unanswered challenges and forget rows older than ``quarantine_days``.

        Returns (expired, deleted). Rows within ``challenge_interval`` and
        the last hour are always kept (the limits count them).
        """
        when = self._clock() if now is None else now
        c = self.settings.community
        keep = max(c.quarantine_days * 86400.0, c.challenge_interval, HOUR)
        with self.db.write() as conn:
            expired = conn.execute(
                "UPDATE challenges SET state = 'expired' WHERE state = 'sent' AND expires_at <= ?",
                (int(when),),
            ).rowcount
            deleted = conn.execute(
                "DELETE FROM challenges WHERE sent_at < ? AND expires_at <= ?",
                (int(when - keep), int(when)),
            ).rowcount
        metrics.sav_challenge("expired", expired)
        return expired, deleted


def _note(conn: sqlite3.Connection, queue_id: str, user: str, note: str) -> None:
    """The quarantine index's ``sav`` column of the held copy: what SAV did about it.

    The quarantine module leaves that column to us (an index refresh keeps
    it); a copy not indexed yet is simply not updated.
    """
    conn.execute(
        "UPDATE quarantine SET sav = ? WHERE queue_id = ? AND user = ?", (note, queue_id, user)
    )


def _reader(conn: sqlite3.Connection) -> Read:
    def read(sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        return conn.execute(sql, params).fetchall()

    return read


def _display_name(from_field: str, sender: str) -> str:
    """The display name of a From field whose address is ``sender``; else ""."""
    from email.utils import getaddresses

    try:
        pairs = getaddresses([from_field])
    except (ValueError, IndexError):
        return ""
    if len(pairs) != 1:
        return ""
    name, addr = pairs[0]
    try:
        same = fold_address(addr) == fold_address(sender)
    except InvalidError:
        return ""
    return name if same else ""
