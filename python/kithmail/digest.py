"""The quarantine digest: a daily mail to each user listing what was newly held for them.

Once a day, at ``[digest] at`` (HH:MM, the server's local time; worker 0 of
`kith serve` runs `run_scheduler`, and `kith digest send` does the same by
hand), every enabled user who has not opted out (`wants`) and has copies
held since their last digest gets one message: From
``<[digest] from_local>@<their domain>``, To the user, ``Auto-Submitted:
auto-generated``, the null envelope sender (a digest that cannot be
delivered bounces nowhere), DKIM-signed by the user's domain when it has a
key (`kith dkim keygen`). It lists at most ``max_items`` copies, newest
first (then a line saying how many more), each with its time, sender,
subject, and why it was held (layer, reason code and detail), and up to
two links to ``<public_url>/digest/<token>``: "release" and "allow the
sender and release". Mail held by the anti-virus layer gets no link (an
admin releases it), and mail from the null sender no "allow" link (there
is no one to allow). The page (`kithmail.public`) shows what a link will do
on GET and does it only on POST (`check`, then `act`).

What is "newly held": copies whose ``held_at`` is after the user's
``user_prefs.digest_last`` and at most a cut-off (``now - SETTLE``, so a
message accepted but not yet indexed when the digest is composed waits for
the next digest instead of being skipped). ``digest_last`` is set to that
cut-off only after the digest is in the spool: a crash in between means
the next pass sends the same digest again, never that a message is skipped.
A user is due for the day's slot when their ``digest_last`` is before that
slot's cut-off; a pass at start catches a slot missed while the server was
down. The digest is spooled for the local user with Outcome.DELIVER: it
never passes the SMTP listener, so no layer (the community's hold, SAV)
ever judges it. Users with a non-ASCII address are skipped (logged): the
digest is written as 7-bit mail.

A link's token binds the action, the user (id and address), the held copy
(queue id and recipient index), an expiry (``[digest] link_ttl``) and a
random nonce, under an HMAC key derived from ``<data_dir>/sav.key``
(`kithmail.sav.tokens.load_key`; removing that file invalidates every
outstanding link). A link acts once: `act` records its nonce in
``used_tokens`` before acting (and forgets it again if the action failed
for a reason of ours), and acts through `kithmail.quarantine` with
``user=`` the link's user, so a link can never touch anyone else's mail,
and every action is audit-logged as ``digest:<user>``.

Trusts nothing of a held message: sender, subject and detail were
sanitised by the quarantine index and are cleaned again here
(`kithmail.sav.message.clean_text`: control and format characters such as
CR, LF and bidi overrides become spaces, bounded); none of them reaches a
header, and in HTML everything is escaped. Trusts nothing of a token: shape,
MAC (constant time), expiry, single use and the user's state are checked.

Standards: RFC 3834 (Auto-Submitted: auto-generated; the null sender),
RFC 5322, RFC 2045–2047 (MIME, quoted-printable), RFC 2046 §5.1.4
(multipart/alternative), RFC 6376 (through the signer), RFC 4648 §6
(base32), RFC 2104 (HMAC).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import functools
import hashlib
import hmac
import html
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email import charset as _charset
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import formataddr, formatdate
from pathlib import Path
from typing import Final, cast

from prometheus_client import Counter

from kithmail import config
from kithmail._core import Core
from kithmail.db import Database, NotFoundError
from kithmail.dkimkeys import Signer, signer_for, unsigned
from kithmail.quarantine import (
    MAX_PAGE,
    AdminOnlyError,
    Held,
    NotHeldError,
    NotLocalError,
    Quarantine,
    QuarantineError,
)
from kithmail.sav.message import clean_text
from kithmail.sav.tokens import load_key
from kithmail.spool import Envelope, Outcome, QueueId, Recipient, Spool

__all__ = [
    "AUDIT_ACTION",
    "SETTLE",
    "Action",
    "Digest",
    "Due",
    "Link",
    "compose",
    "link_key",
    "run_scheduler",
    "set_wants",
    "slot",
    "wants",
]

log = logging.getLogger("kithmail.digest")

AUDIT_ACTION: Final = "digest.preference"
DAY: Final = 86400
# A message is indexed shortly after it is accepted (the spool's fsync
# first); a scheduled digest lists what was held up to this long ago.
SETTLE: Final = 300
MAX_SUBJECT: Final = 120
MAX_SENDER: Final = 254
MAX_DETAIL: Final = 200


@functools.cache
def _counts() -> tuple[Counter, Counter]:
    """The digests sent and failed, made at first use (a `Digest`), never at import.

    `kith serve`'s parent imports this module (kith's parser does) before
    `kithmail.metrics.multiprocess_dir`: a metric without labels made then
    keeps its value in worker 0's memory, which the merged /metrics of
    several workers never reads.
    """
    return (
        Counter("kithmail_digests_sent", "Quarantine digests spooled for delivery to their users."),
        Counter(
            "kithmail_digest_failures",
            "Quarantine digests that could not be composed or spooled (retried at the next pass).",
        ),
    )


LINKS = Counter(
    "kithmail_digest_link_actions",
    "POSTs of digest links, by action and result (a reason code of this module).",
    ["action", "result"],
)


# ---------------------------------------------------------------- the user's preference


def wants(database: Database, user_id: int) -> bool:
    """Whether the user wants the digest (True when they never said; the schema's default)."""
    rows = database.read("SELECT digest FROM user_prefs WHERE user_id = ?", (int(user_id),))
    return True if not rows else bool(rows[0][0])


def set_wants(
    database: Database,
    user_id: int,
    wanted: bool,
    *,
    actor: str,
    now: float | None = None,
) -> None:
    """Turn the user's digest on or off, and audit it; NotFoundError when there is no such user.

    Blocks on a database write: call it in a thread from async code.
    """
    at = int(time.time() if now is None else now)
    with database.write() as conn:
        row = conn.execute(
            "SELECT users.address, tenants.name FROM users JOIN tenants"
            " ON tenants.id = users.tenant WHERE users.id = ?",
            (int(user_id),),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no user with id {user_id}")
        address, tenant = str(row[0]), str(row[1])
        conn.execute(
            "INSERT INTO user_prefs (user_id, digest) VALUES (?, ?)"
            " ON CONFLICT (user_id) DO UPDATE SET digest = excluded.digest",
            (int(user_id), int(bool(wanted))),
        )
        conn.execute(
            "INSERT INTO audit_log (at, actor, tenant, action, target, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (at, actor, tenant, AUDIT_ACTION, address, "on" if wanted else "off"),
        )


# ---------------------------------------------------------------- links


class Action(enum.StrEnum):
    """What one link does: release the copy, or allow its sender and release."""

    RELEASE = "release"
    ALLOW = "allow"


_CODES: Final = {Action.RELEASE: 1, Action.ALLOW: 2}
_ACTIONS: Final = {v: k for k, v in _CODES.items()}
VERSION: Final = 1
NONCE_SIZE: Final = 12
MAC_SIZE: Final = 16
# version, action, user id, rcpt index, expiry, nonce, MAC: 40 bytes, so
# base32 needs no padding (64 characters).
_RAW_SIZE: Final = 1 + 1 + 4 + 2 + 4 + NONCE_SIZE + MAC_SIZE
_QUEUE_ID_LEN: Final = 19
_TOKEN = re.compile(r"([0-9a-hjkmnp-tv-z]{19})([a-z2-7]{64})")
_KEY_LABEL = b"kithmail-digest-link-key\0"
_MAC_LABEL = b"kithmail-digest-link\0"
_TAG_LABEL = b"kithmail-digest-page\0"


def link_key(data_dir: Path) -> bytes:
    """The links' HMAC key: derived from ``<data_dir>/sav.key`` (made at first use)."""
    return hmac.new(load_key(data_dir), _KEY_LABEL, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class Link:
    """What a valid token names."""

    action: Action
    user_id: int
    user: str  # the user's address, folded
    tenant: str
    queue_id: str
    rcpt_index: int
    expires: int  # Unix seconds
    nonce: str  # hex; the used_tokens key


def _field(value: str) -> bytes:
    b = value.encode("utf-8")[:0xFFFF]  # an address or a queue id: far shorter
    return len(b).to_bytes(2, "big") + b


def _mac(
    key: bytes,
    action: Action,
    user_id: int,
    user: str,
    queue_id: str,
    rcpt_index: int,
    expires: int,
    nonce: bytes,
) -> bytes:
    msg = b"".join(
        (
            _MAC_LABEL,
            bytes((VERSION, _CODES[action])),
            user_id.to_bytes(4, "big"),
            rcpt_index.to_bytes(2, "big"),
            expires.to_bytes(4, "big"),
            nonce,
            _field(user),
            _field(queue_id),
        )
    )
    return hmac.new(key, msg, hashlib.sha256).digest()[:MAC_SIZE]


def _token(
    key: bytes,
    action: Action,
    user_id: int,
    user: str,
    queue_id: str,
    rcpt_index: int,
    expires: int,
) -> str:
    if len(queue_id) != _QUEUE_ID_LEN or not 0 <= rcpt_index < 1 << 16:
        raise ValueError(f"not a held copy: {queue_id!r}/{rcpt_index}")
    if not 0 < user_id < 1 << 32 or not 0 < expires < 1 << 32:
        raise ValueError("user id or expiry out of range")
    nonce = secrets.token_bytes(NONCE_SIZE)
    raw = (
        bytes((VERSION, _CODES[action]))
        + user_id.to_bytes(4, "big")
        + rcpt_index.to_bytes(2, "big")
        + expires.to_bytes(4, "big")
        + nonce
        + _mac(key, action, user_id, user, queue_id, rcpt_index, expires, nonce)
    )
    return queue_id + base64.b32encode(raw).decode("ascii").lower()


# ---------------------------------------------------------------- when


def slot(now: float, at: str) -> float:
    """The latest moment at or before ``now`` that is ``at`` (HH:MM) in local time."""
    hour, minute = (int(x) for x in at.split(":"))
    lt = time.localtime(now)
    day = lt.tm_mday
    for _ in range(3):  # today, else yesterday (mktime normalises day 0); DST-safe
        t = time.mktime((lt.tm_year, lt.tm_mon, day, hour, minute, 0, 0, 0, -1))
        if t <= now:
            return t
        day -= 1
    return now - DAY  # unreachable: yesterday's slot is always in the past


# ---------------------------------------------------------------- composing


_POLICY: Final = compat32.clone(linesep="\r\n", max_line_length=78)
_UTF8_QP = _charset.Charset("utf-8")
_UTF8_QP.body_encoding = _charset.QP

# For people, beside the reason code.
_WHY: Final = {
    "community": "the sender is not in your contacts yet",
    "spoofing": "the sender's identity could not be confirmed",
    "antivirus": "a virus or dangerous content was found; only an administrator can release it",
    "reputation": "the sending server has a bad reputation",
    "recon": "the sending server is new",
}


@dataclass(frozen=True, slots=True)
class Due:
    """One user's digest to send: who, since when, what."""

    user_id: int
    user: str
    tenant: str
    since: int  # digest_last: list what was held after this
    cutoff: int  # and at or before this
    held: tuple[Held, ...]  # newest first, at most max_items
    more: int  # held in the window but not listed


@dataclass(frozen=True, slots=True)
class Entry:
    """One listed copy and its links ("" when that action is not offered)."""

    held: Held
    release: str
    allow: str


def _when(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _sender(h: Held) -> str:
    shown = clean_text(h.from_addr or h.sender, MAX_SENDER)
    if h.sender and h.from_addr and h.from_addr.lower() != h.sender.lower():
        shown += f" (envelope {clean_text(h.sender, MAX_SENDER)})"
    return shown or "(no sender: a bounce or automatic message)"


def _why(h: Held) -> str:
    human = _WHY.get(h.layer, "")
    detail = clean_text(h.detail, MAX_DETAIL)
    text = f"{h.layer or 'quarantine'}: {clean_text(h.reason, 80)}"
    if human:
        text += f" ({human})"
    if detail:
        text += f"; {detail}"
    return text


def compose(
    *,
    user: str,
    entries: Sequence[Entry],
    more: int,
    now: float,
    from_local: str,
    link_ttl: float,
    signer: Signer | None = None,
) -> bytes:
    """The digest for ``user`` (ASCII, folded) listing ``entries``, CRLF-terminated, signed.

    ``more`` copies held in the same window are counted, not listed.
    """
    if not user.isascii() or user.count("@") != 1:
        raise ValueError(f"a digest goes to an ASCII address, not {user!r}")
    domain = user.rpartition("@")[2]
    total = len(entries) + more
    noun = "message" if total == 1 else "messages"
    hours = max(1, round(link_ttl / 3600))
    lines = [
        "Hello,",
        "",
        f"{total} new {noun} {'was' if total == 1 else 'were'} held in the quarantine of {user}",
        "since the last digest. Nothing was delivered to your inbox; nothing is lost.",
        f"Each link below opens a page that asks before it acts; it works once, for {hours} hours.",
        "",
    ]
    e = html.escape
    items: list[str] = []
    for n, entry in enumerate(entries, 1):
        h = entry.held
        subject = clean_text(h.subject, MAX_SUBJECT) or "(no subject)"
        lines += [
            f"{n}. {subject}",
            f"   From:    {_sender(h)}",
            f"   Held:    {_when(h.held_at)}",
            f"   Why:     {_why(h)}",
        ]
        links_html = []
        if entry.release:
            lines.append(f"   Release: {entry.release}")
            links_html.append(f'<a href="{e(entry.release)}">Release</a>')
        if entry.allow:
            lines.append(f"   Allow the sender and release: {entry.allow}")
            links_html.append(f'<a href="{e(entry.allow)}">Allow the sender and release</a>')
        if not entry.release and not entry.allow:
            lines.append("   Only an administrator can release this message.")
            links_html.append("<em>Only an administrator can release this message.</em>")
        lines.append("")
        items.append(
            f"<li><strong>{e(subject)}</strong><br>"
            f"From: {e(_sender(h))}<br>Held: {e(_when(h.held_at))}<br>Why: {e(_why(h))}<br>"
            + " &middot; ".join(links_html)
            + "</li>"
        )
    if more:
        lines += [
            f"... and {more} more held {'message' if more == 1 else 'messages'}, not listed.",
            "",
        ]
        items.append(f"<li>&hellip; and {more} more, not listed.</li>")
    lines += [
        "Held mail is deleted after the retention time of your quarantine.",
        "You can turn this digest off on your account page.",
        "",
        f"The mail system of {domain}",
    ]
    text = "\n".join(lines) + "\n"
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Held mail</title></head>\n'
        '<body style="font-family: sans-serif; line-height: 1.5; color: #222;">\n'
        f"<p>{e(lines[2])} {e(lines[3])}</p>\n<p>{e(lines[4])}</p>\n"
        f"<ol>\n{chr(10).join(items)}\n</ol>\n"
        "<p>Held mail is deleted after the retention time of your quarantine. You can turn "
        "this digest off on your account page.</p>\n"
        f"<p>The mail system of {e(domain)}</p>\n</body></html>\n"
    )
    msg = MIMEMultipart("alternative", policy=_POLICY)
    msg["From"] = formataddr((f"Quarantine of {domain}", f"{from_local}@{domain}"))
    msg["To"] = f"<{user}>"
    msg["Subject"] = f"Held mail: {total} new {noun} for {user}"
    msg["Date"] = formatdate(now, usegmt=True)
    msg["Message-ID"] = f"<{secrets.token_hex(16)}.digest@{domain}>"
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834 §5.1
    # typeshed says str; MIMEText takes a Charset too, here to choose QP over base64.
    msg.attach(MIMEText(text, "plain", _UTF8_QP))  # type: ignore[arg-type]
    msg.attach(MIMEText(page, "html", _UTF8_QP))  # type: ignore[arg-type]
    data = msg.as_bytes(policy=_POLICY)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return signer(data) if signer is not None else data


# ---------------------------------------------------------------- the digest of one gateway


class Digest:
    """Digests and their links for one database and quarantine.

    ``core`` is needed only for the "allow" action (it teaches the
    community); ``signer(domain)`` gives a domain's DKIM signer (default:
    `dkimkeys.signer_for` with ``[dkim] selector`` when that key exists,
    else the domain's newest key, as `kithmail.sav.Sav.signer`).
    """

    def __init__(
        self,
        db: Database,
        quarantine: Quarantine,
        settings: config.Settings,
        *,
        core: Core | None = None,
        clock: Callable[[], float] = time.time,
        key: bytes | None = None,
        signer: Callable[[str], Signer] | None = None,
    ) -> None:
        self.db = db
        self.quarantine = quarantine
        self.settings = settings
        self.core = core
        self._clock = clock
        self._key = key if key is not None else link_key(settings.server.data_dir)
        self._signer = signer if signer is not None else self._default_signer
        self._signers: dict[str, Signer] = {}
        _counts()  # at zero on /metrics before the first digest

    def _default_signer(self, domain: str) -> Signer:
        if (s := self._signers.get(domain)) is not None:
            return s
        data_dir = self.settings.server.data_dir
        selector = self.settings.dkim.selector
        path = data_dir / "dkim" / f"{domain}.{selector}.pem"
        s = signer_for(data_dir, domain, selector if path.is_file() else None)
        if s is not unsigned:
            self._signers[domain] = s
        return s

    # --- links ---

    def url(self, token: str) -> str:
        return f"{self.settings.server.public_url.rstrip('/')}/digest/{token}"

    def make_token(
        self, action: Action, user_id: int, user: str, queue_id: str, rcpt_index: int, expires: int
    ) -> str:
        """A link token (83 characters: the queue id, then 64 of ``a-z2-7``)."""
        return _token(self._key, action, user_id, user, queue_id, rcpt_index, expires)

    def page_tag(self, token: str) -> str:
        """The confirmation page's form field for ``token``: only a page we rendered holds it."""
        msg = _TAG_LABEL + token.encode("ascii", "replace")
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def check(self, token: str, *, now: float | None = None) -> Link | str:
        """The link a token names, if it may still act; else why not. Changes nothing.

        Reasons: ``digest.token_malformed``, ``digest.token_forged`` (the MAC
        does not verify, or its user is gone), ``digest.token_expired``,
        ``digest.token_used``, ``digest.user_disabled``.
        """
        when = self._clock() if now is None else now
        m = _TOKEN.fullmatch(token.lower()) if isinstance(token, str) else None
        if m is None:
            return "digest.token_malformed"
        queue_id = m[1]
        try:
            raw = base64.b32decode(m[2].upper())
        except (binascii.Error, ValueError):
            return "digest.token_malformed"
        if len(raw) != _RAW_SIZE or raw[0] != VERSION or raw[1] not in _ACTIONS:
            return "digest.token_malformed"
        action = _ACTIONS[raw[1]]
        user_id = int.from_bytes(raw[2:6], "big")
        rcpt_index = int.from_bytes(raw[6:8], "big")
        expires = int.from_bytes(raw[8:12], "big")
        nonce = raw[12 : 12 + NONCE_SIZE]
        got = raw[12 + NONCE_SIZE :]
        rows = self.db.read(
            "SELECT users.address, users.disabled, tenants.name FROM users JOIN tenants"
            " ON tenants.id = users.tenant WHERE users.id = ?",
            (user_id,),
        )
        user, disabled, tenant = cast(tuple[str, int, str], rows[0]) if rows else ("", 0, "")
        expected = _mac(self._key, action, user_id, user, queue_id, rcpt_index, expires, nonce)
        # Compared even for a missing user, so timing says nothing of which failed.
        if not hmac.compare_digest(expected, got) or not rows:
            return "digest.token_forged"
        if when >= expires:
            return "digest.token_expired"
        if self.db.read("SELECT 1 FROM used_tokens WHERE nonce = ?", (nonce.hex(),)):
            return "digest.token_used"
        if disabled:
            return "digest.user_disabled"
        return Link(action, user_id, user, tenant, queue_id, rcpt_index, expires, nonce.hex())

    def held(self, link: Link) -> Held | None:
        """The copy a link names, if it is still held for the link's user."""
        for h in self.quarantine.held_sync(link.queue_id):
            if h.rcpt_index == link.rcpt_index and h.user == link.user:
                return h
        return None

    def act_sync(self, link: Link, *, now: float | None = None) -> str:
        """Do what the link says, once: ``digest.released`` / ``digest.allowed``, or why not.

        Refusals: ``digest.token_used`` (another POST won), ``digest.not_held``,
        ``digest.admin_only``, ``digest.refused`` (the quarantine's rules:
        not local, no sender to allow). An unexpected error un-spends the
        link (so it can be tried again) and is raised.
        """
        when = self._clock() if now is None else now
        with self.db.write() as conn:
            conn.execute("DELETE FROM used_tokens WHERE expires_at < ?", (int(when) - DAY,))
            claimed = conn.execute(
                "INSERT INTO used_tokens (nonce, expires_at) VALUES (?, ?)"
                " ON CONFLICT (nonce) DO NOTHING",
                (link.nonce, link.expires),
            ).rowcount
        if claimed != 1:
            return self._count(link, "digest.token_used")
        actor = f"digest:{link.user}"
        try:
            if link.action is Action.RELEASE:
                self.quarantine.release_sync(
                    link.queue_id, link.rcpt_index, actor=actor, user=link.user
                )
                return self._count(link, "digest.released")
            if self.core is None:
                raise QuarantineError("this process cannot teach the community (no core)")
            self.quarantine.allow_release_sync(
                link.queue_id, link.rcpt_index, core=self.core, actor=actor, user=link.user
            )
            return self._count(link, "digest.allowed")
        except NotHeldError:
            return self._count(link, "digest.not_held")
        except AdminOnlyError:
            return self._count(link, "digest.admin_only")
        except (NotLocalError, QuarantineError) as e:
            log.warning("digest link of %s refused: %s", link.user, e)
            return self._count(link, "digest.refused")
        except BaseException:
            with self.db.write() as conn:
                conn.execute("DELETE FROM used_tokens WHERE nonce = ?", (link.nonce,))
            self._count(link, "digest.error")
            raise

    def _count(self, link: Link, result: str) -> str:
        LINKS.labels(str(link.action), result).inc()
        log.info(
            "digest link: %s of %s/%d by %s: %s",
            link.action,
            link.queue_id,
            link.rcpt_index,
            link.user,
            result,
        )
        return result

    async def act(self, link: Link) -> str:
        """`act_sync` in a thread."""
        return await asyncio.to_thread(self.act_sync, link)

    # --- who is due, and sending ---

    def due_sync(
        self, *, now: float | None = None, user: str | None = None, force: bool = False
    ) -> list[Due]:
        """The digests a pass at ``now`` sends.

        Scheduled (``force`` False): users whose last digest's cut-off is
        before the current slot's cut-off, listing what was held up to
        ``now - SETTLE``. Forced (``kith digest send --now``): every user
        with anything held since their last digest, up to ``now``. Disabled
        and opted-out users never; ``user`` limits the pass to one address.
        """
        when = self._clock() if now is None else now
        if force:
            cutoff = int(when)
            due_before = cutoff + 1
        else:
            cutoff = int(when) - SETTLE
            due_before = int(slot(when, self.settings.digest.at)) - SETTLE
        sql = (
            "SELECT users.id, users.address, tenants.name, coalesce(user_prefs.digest_last, 0)"
            " FROM users JOIN tenants ON tenants.id = users.tenant"
            " LEFT JOIN user_prefs ON user_prefs.user_id = users.id"
            " WHERE users.disabled = 0 AND coalesce(user_prefs.digest, 1) = 1"
            " AND coalesce(user_prefs.digest_last, 0) < ?"
            " AND EXISTS (SELECT 1 FROM quarantine WHERE quarantine.user = users.address"
            " AND quarantine.held_at > coalesce(user_prefs.digest_last, 0)"
            " AND quarantine.held_at <= ?)"
        )
        params: list[object] = [due_before, cutoff]
        if user is not None:
            sql += " AND users.address = ?"
            params.append(user)
        sql += " ORDER BY users.id"
        out: list[Due] = []
        limit = self.settings.digest.max_items
        for row in self.db.read(sql, params):
            user_id, address, tenant, last = cast(tuple[int, str, str, int], row)
            since = last + 1
            fetched = self.quarantine.list_sync(address, since=since, limit=MAX_PAGE)
            window = [h for h in fetched if h.held_at <= cutoff]
            later = len(fetched) - len(window)
            total = self.quarantine.count_sync(address, since=since) - later
            if not window:
                continue
            shown = tuple(window[:limit])
            out.append(
                Due(user_id, address, tenant, last, cutoff, shown, max(0, total - len(shown)))
            )
        return out

    def entries(self, due: Due, now: float) -> list[Entry]:
        """Each listed copy with the links offered for it."""
        expires = int(now + self.settings.digest.link_ttl)
        out: list[Entry] = []
        for h in due.held:
            release = allow = ""
            if not h.admin_only and h.layer != "antivirus":
                release = self.url(
                    self.make_token(
                        Action.RELEASE, due.user_id, due.user, h.queue_id, h.rcpt_index, expires
                    )
                )
                if h.sender:
                    allow = self.url(
                        self.make_token(
                            Action.ALLOW, due.user_id, due.user, h.queue_id, h.rcpt_index, expires
                        )
                    )
            out.append(Entry(h, release, allow))
        return out

    def send_sync(self, due: Due, spool: Spool, *, now: float | None = None) -> QueueId | None:
        """Compose, spool and record one digest; its queue id (None: skipped, logged).

        ``digest_last`` moves to the digest's cut-off only once the message
        is in the spool. The caller tells the queue (`Queue.notify`, or a
        flush request from another process).
        """
        when = self._clock() if now is None else now
        if not due.user.isascii():
            log.warning("digest for %s skipped: not an ASCII address", due.user)
            return None
        domain = due.user.rpartition("@")[2]
        try:
            data = compose(
                user=due.user,
                entries=self.entries(due, when),
                more=due.more,
                now=when,
                from_local=self.settings.digest.from_local,
                link_ttl=self.settings.digest.link_ttl,
                signer=self._signer(domain),
            )
            envelope = Envelope(
                received=when,
                client_ip="",  # made here
                helo=self.settings.server.hostname,
                mail_from="",  # RFC 3834 §3.3: nothing bounces back to us
                recipients=(Recipient(due.user, Outcome.DELIVER),),
                tenant=due.tenant,
                mail_options=(),  # 7-bit: QP parts, ASCII headers
            )
            # One pass at a time per user: the server's daily pass and a
            # `kith digest send` in another process may find the same user
            # due. Under the database's write lock, a digest is spooled only
            # if no other pass moved `digest_last` since this one read it; a
            # crash before the commit leaves it unmoved (sent again, never
            # skipped).
            with self.db.write() as conn:
                row = conn.execute(
                    "SELECT coalesce(max(digest_last), 0) FROM user_prefs WHERE user_id = ?",
                    (due.user_id,),
                ).fetchone()
                if int(row[0]) != due.since:
                    log.info("digest for %s skipped: another pass sent it", due.user)
                    return None
                queue_id = spool.accept_sync(envelope, data)
                conn.execute(
                    "INSERT INTO user_prefs (user_id, digest_last) VALUES (?, ?)"
                    " ON CONFLICT (user_id) DO UPDATE"
                    " SET digest_last = max(digest_last, excluded.digest_last)",
                    (due.user_id, due.cutoff),
                )
        except Exception:
            _counts()[1].inc()
            raise
        _counts()[0].inc()
        log.info("digest %s to %s: %d listed, %d more", queue_id, due.user, len(due.held), due.more)
        return queue_id

    def pass_sync(
        self,
        spool: Spool,
        notify: Callable[[str], None],
        *,
        now: float | None = None,
        user: str | None = None,
        force: bool = False,
    ) -> list[tuple[str, QueueId]]:
        """One pass: every due digest sent; (user, queue id) of each. Blocks: run in a thread.

        A digest that fails is logged and counted and the pass goes on; the
        user is due again at the next pass.
        """
        when = self._clock() if now is None else now
        sent: list[tuple[str, QueueId]] = []
        for due in self.due_sync(now=when, user=user, force=force):
            try:
                queue_id = self.send_sync(due, spool, now=when)
            except Exception:
                log.exception("digest for %s failed; it is tried again at the next pass", due.user)
                continue
            if queue_id is not None:
                notify(queue_id)
                sent.append((due.user, queue_id))
        return sent


async def run_scheduler(
    digest: Digest,
    spool: Spool,
    notify: Callable[[str], None],
    *,
    clock: Callable[[], float] = time.time,
    poll: float = 1.0,
) -> None:
    """Worker 0's daily digest: a pass at start (for a slot missed while down), then one per slot.

    Polls the clock (which tests move) every ``poll`` seconds; the check is
    one comparison, and a pass reads the database only when the slot moved.
    Reads ``digest.settings`` each time, so a reload's ``[digest]`` (``at``,
    ``enabled``) applies at once.
    """
    done: float | None = None
    while True:
        try:
            current = slot(clock(), digest.settings.digest.at)
            if not digest.settings.digest.enabled:
                done = None  # turned on again: a pass at once, as at start
            elif current != done:
                sent = await asyncio.to_thread(digest.pass_sync, spool, notify, now=clock())
                done = current
                log.info(
                    "digest pass for the slot of %s: %d sent",
                    time.strftime("%Y-%m-%d %H:%M", time.localtime(current)),
                    len(sent),
                )
            await asyncio.sleep(poll)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("digest pass failed; trying again in a minute")
            await asyncio.sleep(60.0)
