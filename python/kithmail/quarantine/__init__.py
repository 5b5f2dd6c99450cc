"""The quarantine: each user's held mail, kept in the spool and listed from the database.

A held copy is a recipient in state HELD in the spool (`kithmail.spool`);
that record is the truth. The database's ``quarantine`` table (schema 2,
`kithmail.db`) is an index derived from it, one row per held copy — user,
tenant, envelope sender, header From, Subject, Date, size, the deciding
verdict's layer, reason and detail, when it was held and when retention
ends — so that listing a user's quarantine never reads a spool file.

Every change goes to the spool first and the index after: `release_sync`
marks the copy PENDING (and asks the running queue to attempt it now
through a flush request), `delete_sync` and the retention sweep mark it
DELETED, and only then is the row dropped. A crash in between leaves a row
without a HELD copy; a crash between the spool's accept and `index_sync`
leaves a HELD copy without a row. `reconcile_sync`, run once at start,
repairs both (the spool wins), so a message accepted for quarantine is in
the quarantine after any crash, once. A message whose recipients are all
final after a mark is removed from the spool.

Rules kept here, not left to callers:

- A release goes back to the original envelope recipient, and only when its
  domain is still local: the queue routes any other domain outbound, and a
  release must never relay (DESIGN.md, "No open relay").
- Mail held by the anti-virus layer (reason ``antivirus.*``) is released by
  an admin only (`AdminOnlyError` otherwise); the check reads the verdicts
  in the spool, not the index.
- `release_sender_sync` (the SAV verification's) releases only copies the
  community held (layer ``community``): a copy held by layers 1–4 stays
  held whoever vouches for the sender (DESIGN.md, "Earlier layers stand").
- Retention deletes a copy only when both its row and its message say it
  is due under the tenant's ``quarantine_days`` at the time of the sweep, so
  nothing is deleted before its time, by a crash, a restart or a change of
  setting.
- Every action is written to the audit log with who did it.
- Quotas and the disk reserve (DESIGN.md, "No loss": a full quarantine
  never makes community mail wait). `hold_allowed_sync`: a copy may be held
  for a user while the user's usage plus the message stays within the
  tenant's ``[community] quarantine_quota`` (an empty quarantine takes any
  one message, so no message is refused for ever by a quota it alone
  exceeds). The SMTP listener asks only when *no* recipient of the message
  is delivered, and then answers 452 4.2.2 (mailbox full, RFC 3463) for the
  whole message: the sender retries and nothing is lost. A message with a
  delivered copy is always taken, its held copies included (over quota,
  then): refusing it would make the member's copy wait. `reserve_for`:
  a message that would only be held keeps twice ``[server] spool_reserve``
  free, one with a delivered copy once, so held mail stops at the first
  line and community mail still has the reserve.
- Allow+release and block teach the user's community (`kithmail._core`,
  kind allow or block, source ``manual`` for the user and ``admin`` for an
  admin) the copy's *sender identity* (`sender_identity`): the
  authenticated identity the community layer recorded when it held the
  copy — the address the community checks, so the next message from it is
  delivered (or discarded) — else the envelope sender. The other copies
  that sender has held for the user are found by envelope sender (the
  index's key), as a SAV verification finds them. The anti-virus rule
  is checked before anything is taught.

Trusts: the spool's files (checksummed by the spool) and the database.
Nothing from the message: Subject, From and Date are decoded (RFC 2047),
stripped of control and bidirectional formatting characters and cut to a
bound before they are stored. Queue ids are checked by the spool before they
name a file.

Threads: the ``*_sync`` methods block on disk and database I/O; the async
twins run them in a thread. Marks of one message are serialised in this
process; across processes (``kith quarantine`` beside the server) the spool's
"a final state never changes" is what keeps a deleted copy deleted.
Standards: RFC 5322 §3.6 (the fields shown), RFC 2047 (encoded words),
RFC 6532 (UTF-8 header fields).
"""

from __future__ import annotations

import asyncio
import email.errors
import email.header
import logging
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Literal, cast

from kithmail import config, metrics
from kithmail._core import Core, InvalidInputError, normalize_address
from kithmail.db import Database, InvalidError, fold_address
from kithmail.layers import Action, Layer, Verdict
from kithmail.layers.community import list_id
from kithmail.layers.spoofing import dmarc
from kithmail.spool import (
    MessageNotFoundError,
    Outcome,
    Recipient,
    RecipientStatus,
    Spool,
    SpooledMessage,
    SpoolError,
    State,
    StateError,
)
from kithmail.tenants import Policies

__all__ = [
    "HELD_COLUMNS",
    "AdminOnlyError",
    "Held",
    "NotHeldError",
    "NotLocalError",
    "Quarantine",
    "QuarantineError",
    "Reconciled",
    "Shown",
    "Swept",
    "Taught",
    "deciding_verdict",
    "held_from_row",
    "like_pattern",
    "reserve_for",
    "sender_identity",
]

log = logging.getLogger("kithmail.quarantine")

DAY: Final = 86400
MAX_SUBJECT: Final = 200  # characters of Subject kept for the index
MAX_FROM: Final = 254  # an address's maximum (RFC 5321 §4.5.3.1.3)
MAX_DATE: Final = 64
MAX_DETAIL: Final = 1000
MAX_HEADER: Final = 64 * 1024  # bytes of header block read for show and the index
MAX_PAGE: Final = 1000
SWEEP_LIMIT: Final = 1000
RETENTION_ACTOR: Final = "system:retention"

# Bidirectional overrides and isolates: shown as stored, they could make a
# subject read backwards in a terminal or a browser.
_BIDI: Final = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


# ---------------------------------------------------------------- errors and values


class QuarantineError(Exception):
    """The quarantine could not do what was asked; the message says why."""


class NotHeldError(QuarantineError, LookupError):
    """No such held copy (never held, already released or deleted, or not yours)."""


class AdminOnlyError(QuarantineError):
    """Mail held by the anti-virus layer is released by an admin only."""


class NotLocalError(QuarantineError):
    """The copy's recipient domain is no longer local: releasing it would relay."""


@dataclass(frozen=True, slots=True)
class Held:
    """One held copy as the index has it; times are Unix seconds."""

    queue_id: str
    rcpt_index: int
    tenant: str
    user: str
    sender: str  # the envelope sender, folded ("" for the null sender)
    from_addr: str  # the header From address ("" when none could be read)
    subject: str  # decoded and sanitised
    date: str  # the Date field as written, sanitised
    size: int
    layer: str  # of the deciding verdict
    reason: str
    detail: str
    sav: str  # the SAV module's note ("" until it writes one)
    held_at: int
    expires_at: int

    @property
    def admin_only(self) -> bool:
        """Held by the anti-virus layer: only an admin may release it."""
        return self.reason.startswith("antivirus.")


@dataclass(frozen=True, slots=True)
class Shown:
    """A held copy in full: its row, the envelope recipient, every verdict, the header."""

    held: Held
    recipient: str  # the RCPT TO address the release delivers to
    mail_from: str  # the envelope sender as received
    client_ip: str
    helo: str
    verdicts: tuple[Verdict, ...]
    headers: str  # the header block, decoded as UTF-8 (bounded)


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What `reconcile_sync` found: copies held, rows added, stale rows removed."""

    held: int
    added: int
    removed: int


@dataclass(frozen=True, slots=True)
class Swept:
    """One retention pass: copies deleted, messages removed, rows seen not yet due."""

    deleted: int
    removed: int
    kept: int
    more: bool  # the pass stopped at its limit: call again


@dataclass(frozen=True, slots=True)
class Taught:
    """What allow+release or block did: the entry added, and the copies released or deleted."""

    entry: str  # as added to the community (folded)
    kind: str  # "allow" or "block"
    added: bool  # False when the entry was there already
    copies: tuple[Held, ...]  # released (allow) or deleted (block), the chosen one first


# ---------------------------------------------------------------- helpers


def sender_identity(recipient: Recipient, envelope_sender: str) -> str:
    """The address to teach for a held copy: its authenticated identity, else the envelope sender.

    The community layer names the authenticated identity it looked up at
    the start of its ``community.unknown`` detail (``unknown: <identity>
    (<how>) …``); that is what it will look up next time, so allowing it is
    what makes the next message from that author delivered. A copy held
    without an authenticated identity (or by a layer that did not record
    one) gives the envelope sender; "" when that is the null sender.
    """
    for v in recipient.verdicts:
        if v.layer is Layer.COMMUNITY and v.detail.startswith("unknown: "):
            candidate = v.detail[len("unknown: ") :].split(" ", 1)[0]
            try:
                return normalize_address(candidate)
            except InvalidInputError:
                break
    return _fold_sender(envelope_sender)


def deciding_verdict(recipient: Recipient) -> Verdict | None:
    """The verdict that holds this copy: the anti-virus layer's if it held it, else the first.

    Layers record in order (RCPT layers, then 3, 4 and 5), so the first
    acting quarantine is the earliest layer's; an anti-virus hold is named
    whatever else held the copy too, so that it can never be released as
    something milder.
    """
    holding = [v for v in recipient.verdicts if v.acts and v.action is Action.QUARANTINE]
    for v in holding:
        if v.layer is Layer.ANTIVIRUS:
            return v
    return holding[0] if holding else None


def reserve_for(outcomes: Iterable[Outcome], base: int) -> int:
    """The spool reserve for one message: 2 × `base` when it would only be held, else `base`.

    "Only held": at least one copy held and none delivered (discarded
    copies take no room for long). Mail for a community member may use the
    disk down to the configured reserve; held mail stops at twice that.
    """
    seen = set(outcomes)
    if Outcome.QUARANTINE in seen and Outcome.DELIVER not in seen:
        return 2 * base
    return base


def _clean(text: str, limit: int) -> str:
    """One line of text for people: no controls, no bidi formatting, bounded."""
    out: list[str] = []
    for c in text:
        cat = unicodedata.category(c)
        if c in _BIDI or cat in ("Cf", "Cs", "Co", "Cn"):
            continue
        out.append(" " if cat in ("Cc", "Zl", "Zp") else c)
    s = " ".join("".join(out).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _decoded(value: str) -> str:
    """An unstructured field's text with its encoded words decoded (RFC 2047)."""
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        return value


def _fold_sender(address: str) -> str:
    if not address:
        return ""
    try:
        return normalize_address(address)
    except InvalidInputError:
        return address.lower()


def _fold_user(user: str) -> str:
    try:
        return fold_address(user)
    except InvalidError:
        return user.lower()


def _header_lines(msg: SpooledMessage) -> list[bytes]:
    with msg.open() as f:
        raw = f.read(MAX_HEADER)
    out: list[bytes] = []
    for line in raw.splitlines(keepends=True):
        if not line.strip(b"\r\n"):
            break
        out.append(line)
    return out


HELD_COLUMNS = (
    "queue_id, rcpt_index, tenant, user, sender, from_addr, subject, date, size,"
    " layer, reason, detail, sav, held_at, expires_at"
)
_UPSERT = (
    "INSERT INTO quarantine (queue_id, rcpt_index, tenant, user, sender, from_addr, subject,"
    " date, size, layer, reason, detail, held_at, expires_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    # The sav column is the SAV module's: an index refresh keeps it.
    " ON CONFLICT (queue_id, rcpt_index) DO UPDATE SET tenant = excluded.tenant,"
    " user = excluded.user, sender = excluded.sender, from_addr = excluded.from_addr,"
    " subject = excluded.subject, date = excluded.date, size = excluded.size,"
    " layer = excluded.layer, reason = excluded.reason, detail = excluded.detail,"
    " held_at = excluded.held_at, expires_at = excluded.expires_at"
)


def held_from_row(row: Sequence[object]) -> Held:
    """A `Held` from one row of ``SELECT {HELD_COLUMNS} FROM quarantine``."""
    q, i, tenant, user, sender, frm, subject, date, size, layer, reason, detail, sav, at, exp = row
    return Held(
        cast(str, q),
        cast(int, i),
        cast(str, tenant),
        cast(str, user),
        cast(str, sender),
        cast(str, frm),
        cast(str, subject),
        cast(str, date),
        cast(int, size),
        cast(str, layer),
        cast(str, reason),
        cast(str, detail),
        cast(str, sav),
        cast(int, at),
        cast(int, exp),
    )


def like_pattern(text: str) -> str:
    """A LIKE pattern (ESCAPE '\\') matching ``text`` anywhere, its wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# ---------------------------------------------------------------- the quarantine


class Quarantine:
    """The quarantine of one spool and one database.

    `policies` gives each recipient's tenant settings (`quarantine_days`)
    and which domains are local; without it the built-in defaults apply
    and no domain is checked (tests). `clock` gives the audit and the
    default `now` of a sweep.
    """

    def __init__(
        self,
        db: Database,
        spool: Spool,
        *,
        policies: Policies | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.spool = spool
        self.policies = policies
        self._defaults = config.Settings()
        self._clock = clock
        self._locks = [threading.Lock() for _ in range(64)]

    def __repr__(self) -> str:
        return f"<Quarantine {self.spool.root} {self.db.path}>"

    @contextmanager
    def _locked(self, queue_id: str) -> Iterator[None]:
        with self._locks[hash(queue_id) % len(self._locks)]:
            yield

    def _settings(self, address: str) -> config.Settings:
        if self.policies is not None:
            p = self.policies.for_domain(address.rpartition("@")[2].lower())
            if p is not None:
                return p.settings
            return self.policies.settings  # the settings in force, reloaded by SIGHUP
        return self._defaults

    def _tenant(self, msg: SpooledMessage, address: str) -> str:
        if msg.envelope.tenant:
            return msg.envelope.tenant
        if self.policies is not None:
            p = self.policies.for_domain(address.rpartition("@")[2].lower())
            if p is not None:
                return p.tenant
        return ""

    def _user(self, address: str) -> str:
        found = self.db.find_user(address)
        return found.address if found is not None else _fold_user(address)

    def _days(self, address: str) -> int:
        return self._settings(address).community.quarantine_days

    # ------------------------------------------------------------ the index

    def _rows(self, msg: SpooledMessage) -> list[tuple[object, ...]]:
        held = [r for r in msg.recipients if r.state is State.HELD]
        if not held:
            return []
        lines = _header_lines(msg)
        fields = dmarc.header_fields(lines)

        def first(name: str) -> str:
            return next((v for n, v in fields if n == name), "")

        subject = _clean(_decoded(first("subject")), MAX_SUBJECT)
        date = _clean(first("date"), MAX_DATE)
        author = dmarc.author(lines)
        from_addr = ""
        if author.addresses:
            local, domain = author.addresses[0]
            from_addr = _clean(f"{local}@{domain}", MAX_FROM)
        env = msg.envelope
        sender = _fold_sender(env.mail_from)
        received = int(env.received)
        rows: list[tuple[object, ...]] = []
        for r in held:
            address = r.recipient.address
            v = deciding_verdict(r.recipient)
            layer, reason, detail = (
                (str(v.layer), v.reason, v.detail)
                if v is not None
                else ("", "quarantine.unrecorded", "held without a recorded verdict")
            )
            rows.append(
                (
                    msg.queue_id,
                    r.index,
                    self._tenant(msg, address),
                    self._user(address),
                    sender,
                    from_addr,
                    subject,
                    date,
                    msg.size,
                    layer,
                    reason,
                    _clean(detail, MAX_DETAIL),
                    received,
                    received + self._days(address) * DAY,
                )
            )
        return rows

    def _index(self, msg: SpooledMessage) -> int:
        rows = self._rows(msg)
        keep = [cast(int, row[1]) for row in rows]
        with self.db.write() as conn:
            marks = ",".join("?" * len(keep))
            conn.execute(
                f"DELETE FROM quarantine WHERE queue_id = ? AND rcpt_index NOT IN ({marks})",
                (msg.queue_id, *keep),
            )
            conn.executemany(_UPSERT, rows)
        return len(rows)

    def _drop(self, queue_id: str, rcpt_index: int | None = None) -> None:
        with self.db.write() as conn:
            if rcpt_index is None:
                conn.execute("DELETE FROM quarantine WHERE queue_id = ?", (queue_id,))
            else:
                conn.execute(
                    "DELETE FROM quarantine WHERE queue_id = ? AND rcpt_index = ?",
                    (queue_id, rcpt_index),
                )

    def index_sync(self, queue_id: str) -> int:
        """Make the index say what the spool says of one message; the rows written.

        Called after the spool accepted a message with a held recipient.
        Idempotent: rows of recipients no longer HELD are dropped, the others
        written again (their SAV note kept).
        """
        with self._locked(queue_id):
            try:
                msg = self.spool.load_sync(queue_id, verify=False)
            except MessageNotFoundError:
                self._drop(queue_id)
                return 0
            return self._index(msg)

    def reconcile_sync(self) -> Reconciled:
        """At start: every HELD copy in the spool gets its row; rows of no HELD copy go.

        A message the spool cannot read now (a newer format, a damaged file)
        keeps whatever rows it had.
        """
        existing = {
            (cast(str, q), cast(int, i))
            for q, i in self.db.read("SELECT queue_id, rcpt_index FROM quarantine")
        }
        held: set[tuple[str, int]] = set()
        unreadable: set[str] = set()
        to_index: list[str] = []
        for qid in self.spool.queue_ids_sync():
            try:
                msg = self.spool.load_sync(qid, verify=False)
            except MessageNotFoundError:
                continue
            except SpoolError as e:
                log.warning("quarantine: %s unreadable, its index rows kept: %s", qid, e)
                unreadable.add(qid)
                continue
            keys = {(qid, r.index) for r in msg.recipients if r.state is State.HELD}
            held |= keys
            if keys - existing:
                to_index.append(qid)
        for name in to_index:
            self.index_sync(name)
        stale = [k for k in existing - held if k[0] not in unreadable]
        for start in range(0, len(stale), 500):
            with self.db.write() as conn:
                conn.executemany(
                    "DELETE FROM quarantine WHERE queue_id = ? AND rcpt_index = ?",
                    stale[start : start + 500],
                )
        added = len(held - existing)
        if added or stale:
            log.info(
                "quarantine reconciled: %d held, %d rows added, %d stale rows removed",
                len(held),
                added,
                len(stale),
            )
        return Reconciled(len(held), added, len(stale))

    # ------------------------------------------------------------ reading

    def _where(
        self, user: str, sender: str | None, subject: str | None, since: int | None
    ) -> tuple[str, list[object]]:
        sql = "user = ?"
        params: list[object] = [_fold_user(user)]
        if sender:
            sql += " AND (sender LIKE ? ESCAPE '\\' OR from_addr LIKE ? ESCAPE '\\')"
            params += [like_pattern(sender), like_pattern(sender)]
        if subject:
            sql += " AND subject LIKE ? ESCAPE '\\'"
            params.append(like_pattern(subject))
        if since is not None:
            sql += " AND held_at >= ?"
            params.append(int(since))
        return sql, params

    def list_sync(
        self,
        user: str,
        *,
        sender: str | None = None,
        subject: str | None = None,
        since: int | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Held]:
        """A user's held copies, newest first.

        `sender` matches part of the envelope sender or the header From,
        `subject` part of the Subject (both case-insensitively, ASCII);
        `since` keeps copies held at or after that time; `limit` (at most
        1000) and `offset` page.
        """
        if not 1 <= limit <= MAX_PAGE or offset < 0:
            raise ValueError(f"limit is 1 to {MAX_PAGE} and offset is not negative")
        where, params = self._where(user, sender, subject, since)
        rows = self.db.read(
            f"SELECT {HELD_COLUMNS} FROM quarantine WHERE {where}"
            " ORDER BY held_at DESC, queue_id DESC, rcpt_index DESC LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        return [held_from_row(r) for r in rows]

    def count_sync(
        self,
        user: str,
        *,
        sender: str | None = None,
        subject: str | None = None,
        since: int | None = None,
    ) -> int:
        """How many copies `list_sync` would page through with these filters."""
        where, params = self._where(user, sender, subject, since)
        return cast(
            int, self.db.read(f"SELECT count(*) FROM quarantine WHERE {where}", params)[0][0]
        )

    def usage_sync(self, user: str) -> int:
        """Bytes held for a user (each copy counts its message's size), for the quota."""
        row = self.db.read(
            "SELECT coalesce(sum(size), 0) FROM quarantine WHERE user = ?", (_fold_user(user),)
        )
        return cast(int, row[0][0])

    def hold_allowed_sync(self, user: str, size: int) -> tuple[bool, str]:
        """May one more copy of `size` bytes be held for `user`? (allowed, why not).

        Within the quota of the user's tenant: usage plus `size` at most
        ``quarantine_quota``; an empty quarantine takes any one message.
        """
        quota = int(self._settings(user).community.quarantine_quota)
        used = self.usage_sync(self._user(user))
        if used == 0 or used + size <= quota:
            return True, ""
        return False, f"quarantine of {_fold_user(user)} is full ({used} of {quota} bytes held)"

    def held_sync(self, queue_id: str) -> list[Held]:
        """The indexed held copies of one message, by recipient index."""
        rows = self.db.read(
            f"SELECT {HELD_COLUMNS} FROM quarantine WHERE queue_id = ? ORDER BY rcpt_index",
            (queue_id,),
        )
        return [held_from_row(r) for r in rows]

    def _row(self, queue_id: str, rcpt_index: int) -> Held | None:
        rows = self.db.read(
            f"SELECT {HELD_COLUMNS} FROM quarantine WHERE queue_id = ? AND rcpt_index = ?",
            (queue_id, rcpt_index),
        )
        return held_from_row(rows[0]) if rows else None

    def _current(
        self, queue_id: str, rcpt_index: int, user: str | None
    ) -> tuple[Held, SpooledMessage, RecipientStatus]:
        """The held copy as the spool has it (the row repaired if need be); caller holds the lock."""
        what = f"{queue_id}/{rcpt_index}"
        try:
            msg = self.spool.load_sync(queue_id, verify=False)
        except MessageNotFoundError:
            self._drop(queue_id)
            raise NotHeldError(f"{what}: no such message in the spool") from None
        if not 0 <= rcpt_index < len(msg.recipients):
            raise NotHeldError(f"{what}: the message has no recipient {rcpt_index}")
        r = msg.recipients[rcpt_index]
        if r.state is not State.HELD:
            self._drop(queue_id, rcpt_index)
            raise NotHeldError(f"{what}: not held (it is {r.state})")
        held = self._row(queue_id, rcpt_index)
        if held is None:
            self._index(msg)
            held = self._row(queue_id, rcpt_index)
            assert held is not None
        if user is not None and held.user != _fold_user(user):
            # The same answer as for a copy that does not exist: no one
            # learns what is held for someone else.
            raise NotHeldError(f"{what}: not held")
        return held, msg, r

    def show_sync(self, queue_id: str, rcpt_index: int, *, user: str | None = None) -> Shown:
        """One held copy in full; `user` set: only if it is that user's."""
        with self._locked(queue_id):
            held, msg, r = self._current(queue_id, rcpt_index, user)
        try:
            head = b"".join(_header_lines(msg)).decode("utf-8", "replace")
        except MessageNotFoundError:
            # Released and delivered, or deleted, since the lock was let go.
            raise NotHeldError(f"{queue_id}/{rcpt_index}: not held any more") from None
        env = msg.envelope
        return Shown(
            held,
            r.recipient.address,
            env.mail_from,
            env.client_ip,
            env.helo,
            r.recipient.verdicts,
            head,
        )

    # ------------------------------------------------------------ actions

    def _finish(self, queue_id: str) -> bool:
        """Remove the message if every recipient is final now; True if removed."""
        try:
            msg = self.spool.load_sync(queue_id, verify=False)
            if msg.pending:
                return False
            self.spool.remove_sync(queue_id)
        except (MessageNotFoundError, StateError):
            return False  # removed, or moved on, by someone else meanwhile
        return True

    def _audit(self, actor: str, action: str, held: Held, detail: str = "") -> None:
        self.db.audit(
            actor,
            action,
            tenant=held.tenant,
            target=f"{held.queue_id}/{held.rcpt_index}",
            detail=" ".join(
                x
                for x in (
                    f"user={held.user}",
                    f"sender=<{held.sender}>",
                    f"reason={held.reason}",
                    detail,
                )
                if x
            ),
        )

    def _check_admin(self, held: Held, r: RecipientStatus, *, actor: str, admin: bool) -> None:
        """`AdminOnlyError` for an anti-virus hold unless `admin`; the spool's verdicts decide."""
        v = deciding_verdict(r.recipient)
        antivirus = v is not None and v.reason.startswith("antivirus.")
        if (antivirus or held.admin_only) and not admin:
            self._audit(actor, "quarantine.release_refused", held, "admin only")
            why = v.reason if v is not None and antivirus else held.reason
            raise AdminOnlyError(
                f"{held.queue_id}/{held.rcpt_index} was held by the anti-virus layer "
                f"({why}): only an admin may release it"
            )

    def release_sync(
        self,
        queue_id: str,
        rcpt_index: int,
        *,
        actor: str,
        admin: bool = False,
        user: str | None = None,
    ) -> Held:
        """Deliver one held copy to its original recipient, now.

        The spool marks it PENDING, then the row goes and the running queue
        is asked to attempt the message. `AdminOnlyError` for anti-virus
        holds unless `admin`; `NotLocalError` when the recipient's domain is
        no longer local; `NotHeldError` when there is no such held copy (or,
        with `user`, not that user's).
        """
        with self._locked(queue_id):
            held, _msg, r = self._current(queue_id, rcpt_index, user)
            self._check_admin(held, r, actor=actor, admin=admin)
            domain = r.recipient.address.rpartition("@")[2].lower()
            if self.policies is not None and not self.policies.is_local(domain):
                raise NotLocalError(
                    f"{queue_id}/{rcpt_index}: {domain} is no longer a local domain; "
                    "a release never relays"
                )
            self.spool.mark_sync(
                queue_id, rcpt_index, State.PENDING, f"released from quarantine by {actor}"
            )
            self._drop(queue_id, rcpt_index)
        # Outside the lock: the mark is durable, and a lost request only
        # means the queue finds the copy at its next start.
        try:
            self.spool.request_flush_sync(queue_id)
        except SpoolError as e:
            log.error("quarantine: %s released, but the flush request failed: %s", queue_id, e)
        self._audit(actor, "quarantine.release", held, "as admin" if admin else "")
        return held

    def release_sender_sync(self, user: str, sender: str, *, actor: str) -> list[Held]:
        """Release every copy the community held for `user` from envelope `sender`, oldest first.

        What a verified SAV challenge does. Copies held by an earlier layer
        (anti-spoofing, anti-virus, …) stay held.
        """
        rows = self.db.read(
            f"SELECT {HELD_COLUMNS} FROM quarantine WHERE user = ? AND sender = ? AND layer = ?"
            " ORDER BY held_at, queue_id, rcpt_index",
            (_fold_user(user), _fold_sender(sender), str(Layer.COMMUNITY)),
        )
        released: list[Held] = []
        for row in rows:
            h = held_from_row(row)
            try:
                released.append(self.release_sync(h.queue_id, h.rcpt_index, actor=actor, user=user))
            except NotHeldError:
                continue  # released or deleted meanwhile
            except (AdminOnlyError, NotLocalError) as e:
                log.warning("quarantine: %s", e)
        return released

    def _teach(
        self,
        core: Core,
        held: Held,
        entry: str,
        kind: Literal["allow", "block"],
        *,
        actor: str,
        admin: bool,
    ) -> bool:
        source: Literal["admin", "manual"] = "admin" if admin else "manual"
        try:
            added = core.community.add(held.user, entry, kind, source, int(self._clock()))
        except InvalidInputError as e:
            raise QuarantineError(
                f"{held.queue_id}/{held.rcpt_index}: cannot add {entry!r}: {e}"
            ) from None
        self._audit(
            actor,
            f"quarantine.{kind}",
            held,
            f"entry={entry} source={source}" + ("" if added else " (already there)"),
        )
        return added

    def allow_release_sync(
        self,
        queue_id: str,
        rcpt_index: int,
        *,
        core: Core,
        actor: str,
        admin: bool = False,
        user: str | None = None,
    ) -> Taught:
        """Allow the copy's sender (`sender_identity`) in the user's community, then release.

        This copy is released whatever layer held it (the user chose it, and
        the anti-virus rule holds: `AdminOnlyError` before anything is
        taught); then every other copy the community held for that user
        from the same envelope sender (`release_sender_sync`).
        `QuarantineError` when there is no address to allow (the null
        sender, unauthenticated).
        """
        with self._locked(queue_id):
            held, _msg, r = self._current(queue_id, rcpt_index, user)
            self._check_admin(held, r, actor=actor, admin=admin)
            entry = sender_identity(r.recipient, held.sender)
        if not entry:
            raise QuarantineError(
                f"{queue_id}/{rcpt_index}: no sender to allow (the null sender, unauthenticated)"
            )
        added = self._teach(core, held, entry, "allow", actor=actor, admin=admin)
        first = self.release_sync(queue_id, rcpt_index, actor=actor, admin=admin, user=user)
        rest = self.release_sender_sync(held.user, held.sender, actor=actor) if held.sender else []
        return Taught(entry, "allow", added, (first, *rest))

    def allow_list_release_sync(
        self,
        queue_id: str,
        rcpt_index: int,
        *,
        core: Core,
        actor: str,
        admin: bool = False,
        user: str | None = None,
    ) -> Taught:
        """Allow ``list:<List-Id>`` of the held message in the user's community, then release it.

        The entry matches later mail only when the list's own domain signs
        it or SPF-passes it (`kithmail.layers.community`). `QuarantineError`
        when the message has no (single, well-formed) List-Id.
        """
        with self._locked(queue_id):
            held, msg, r = self._current(queue_id, rcpt_index, user)
            self._check_admin(held, r, actor=actor, admin=admin)
            ident = list_id(_header_lines(msg))
        if ident is None:
            raise QuarantineError(f"{queue_id}/{rcpt_index}: the message has no List-Id")
        entry = f"list:{ident}"
        added = self._teach(core, held, entry, "allow", actor=actor, admin=admin)
        first = self.release_sync(queue_id, rcpt_index, actor=actor, admin=admin, user=user)
        return Taught(entry, "allow", added, (first,))

    def block_sync(
        self,
        queue_id: str,
        rcpt_index: int,
        *,
        core: Core,
        actor: str,
        admin: bool = False,
        user: str | None = None,
    ) -> Taught:
        """Block the copy's sender (`sender_identity`) in the user's community, and delete.

        This copy is deleted, then every other copy held for that user from
        the same envelope sender, whatever layer held it (a delete never
        delivers). Later mail from the blocked identity is discarded by the
        community layer. `QuarantineError` when there is no address to block.
        """
        with self._locked(queue_id):
            held, _msg, r = self._current(queue_id, rcpt_index, user)
            entry = sender_identity(r.recipient, held.sender)
        if not entry:
            raise QuarantineError(
                f"{queue_id}/{rcpt_index}: no sender to block (the null sender, unauthenticated)"
            )
        added = self._teach(core, held, entry, "block", actor=actor, admin=admin)
        deleted = [self.delete_sync(queue_id, rcpt_index, actor=actor, user=user)]
        if held.sender:
            rows = self.db.read(
                f"SELECT {HELD_COLUMNS} FROM quarantine WHERE user = ? AND sender = ?"
                " ORDER BY held_at, queue_id, rcpt_index",
                (held.user, held.sender),
            )
            for row in rows:
                h = held_from_row(row)
                try:
                    deleted.append(
                        self.delete_sync(h.queue_id, h.rcpt_index, actor=actor, user=held.user)
                    )
                except NotHeldError:
                    continue  # released or deleted meanwhile
        return Taught(entry, "block", added, tuple(deleted))

    def delete_sync(
        self, queue_id: str, rcpt_index: int, *, actor: str, user: str | None = None
    ) -> Held:
        """Delete one held copy (state DELETED); the message goes when nothing else waits."""
        with self._locked(queue_id):
            held, _msg, _r = self._current(queue_id, rcpt_index, user)
            self.spool.mark_sync(
                queue_id, rcpt_index, State.DELETED, f"deleted from quarantine by {actor}"
            )
            self._drop(queue_id, rcpt_index)
            self._finish(queue_id)
        self._audit(actor, "quarantine.delete", held)
        return held

    def sweep_sync(self, now: float | None = None, limit: int = SWEEP_LIMIT) -> Swept:
        """Retention: delete at most `limit` copies whose time is up at `now`.

        A copy goes only when its row's `expires_at` and its message's
        arrival plus the tenant's current `quarantine_days` are both past;
        a row that is not yet due by the second measure gets the later
        date and stays. Call it again while `more` is true.
        """
        t = int(self._clock() if now is None else now)
        rows = self.db.read(
            f"SELECT {HELD_COLUMNS} FROM quarantine WHERE expires_at <= ?"
            " ORDER BY expires_at, queue_id, rcpt_index LIMIT ?",
            (t, limit),
        )
        deleted = removed = kept = 0
        for row in rows:
            h = held_from_row(row)
            with self._locked(h.queue_id):
                try:
                    msg = self.spool.load_sync(h.queue_id, verify=False)
                except MessageNotFoundError:
                    self._drop(h.queue_id)
                    continue
                if not 0 <= h.rcpt_index < len(msg.recipients):
                    self._drop(h.queue_id, h.rcpt_index)
                    continue
                r = msg.recipients[h.rcpt_index]
                if r.state is not State.HELD:
                    self._drop(h.queue_id, h.rcpt_index)
                    continue
                days = self._days(r.recipient.address)
                due = int(msg.envelope.received) + days * DAY
                if due > t:
                    with self.db.write() as conn:
                        conn.execute(
                            "UPDATE quarantine SET expires_at = ?"
                            " WHERE queue_id = ? AND rcpt_index = ?",
                            (due, h.queue_id, h.rcpt_index),
                        )
                    kept += 1
                    continue
                try:
                    self.spool.mark_sync(
                        h.queue_id,
                        h.rcpt_index,
                        State.DELETED,
                        f"expired after {days} days in quarantine",
                    )
                except StateError:
                    self._drop(h.queue_id, h.rcpt_index)
                    continue
                self._drop(h.queue_id, h.rcpt_index)
                deleted += 1
                if self._finish(h.queue_id):
                    removed += 1
            self._audit(RETENTION_ACTOR, "quarantine.expire", h, f"days={days}")
        if deleted:
            metrics.quarantine_expired(deleted)
        return Swept(deleted, removed, kept, more=len(rows) == limit)

    # ------------------------------------------------------------ async twins

    async def index(self, queue_id: str) -> int:
        return await asyncio.to_thread(self.index_sync, queue_id)

    async def reconcile(self) -> Reconciled:
        return await asyncio.to_thread(self.reconcile_sync)

    async def release(
        self,
        queue_id: str,
        rcpt_index: int,
        *,
        actor: str,
        admin: bool = False,
        user: str | None = None,
    ) -> Held:
        return await asyncio.to_thread(
            lambda: self.release_sync(queue_id, rcpt_index, actor=actor, admin=admin, user=user)
        )

    async def hold_allowed(self, user: str, size: int) -> tuple[bool, str]:
        return await asyncio.to_thread(self.hold_allowed_sync, user, size)

    async def release_sender(self, user: str, sender: str, *, actor: str) -> list[Held]:
        return await asyncio.to_thread(lambda: self.release_sender_sync(user, sender, actor=actor))

    async def delete(
        self, queue_id: str, rcpt_index: int, *, actor: str, user: str | None = None
    ) -> Held:
        return await asyncio.to_thread(
            lambda: self.delete_sync(queue_id, rcpt_index, actor=actor, user=user)
        )

    async def sweep(self, now: float | None = None, limit: int = SWEEP_LIMIT) -> Swept:
        return await asyncio.to_thread(self.sweep_sync, now, limit)
