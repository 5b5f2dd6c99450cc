"""Held mail for the web: scoped listing and lookup, reading a message, the actions.

The one rule: a principal reaches a held copy only when it may see the
copy's user (`kithmail.web.auth.may_see_user`: themself, a tenant admin of
the user's tenant, a global admin). `find_held` looks a copy up by
(queue id, recipient index) from a URL or a body and answers 404 — the
same as for a copy that does not exist — when the principal may not see
it; `list_held` lists only users the caller has already checked; the
actions pass the copy's own user on to `kithmail.quarantine`, which checks
it again against the spool.

Reading a message (`read_message`) parses at most `MAX_PARSE` bytes of it
with the standard library's parser in a thread; what comes out — the text
part, the HTML part, attachment names — is text to be escaped by the
templates, with bidirectional-override and other invisible formatting
characters made visible (`visible`), so that neither a subject nor a
file name can read backwards. The HTML part is served only into a
sandboxed frame (`kithmail.web.security.CSP_SANDBOXED_HTML`) with its
``<meta>`` and ``<base>`` tags defused, or shown as plain text.

Trusts: the quarantine index and the spool (the quarantine module's).
Nothing of the message.
Standards: RFC 5322 and RFC 2045–2047 (MIME, encoded words), RFC 2183
(Content-Disposition file names), RFC 2231 (parameter encoding).
"""

from __future__ import annotations

import asyncio
import email.message
import email.parser
import email.policy
import html
import html.parser
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, cast

from kithmail.db import InvalidError, fold_address
from kithmail.quarantine import (
    HELD_COLUMNS,
    AdminOnlyError,
    Held,
    NotHeldError,
    NotLocalError,
    QuarantineError,
    Shown,
    held_from_row,
    like_pattern,
)
from kithmail.spool import MessageNotFoundError, SpoolError
from kithmail.web.auth import Principal, may_manage_tenant
from kithmail.web.errors import ApiError
from kithmail.web.services import Services

__all__ = [
    "ACTIONS",
    "Action",
    "ActionResult",
    "Attachment",
    "MessageView",
    "act",
    "find_held",
    "list_held",
    "parse_id",
    "read_message",
    "visible",
]

MAX_PARSE: Final = 8 * 1024 * 1024  # bytes of a message parsed for the view
MAX_TEXT: Final = 256 * 1024  # characters of a text part shown
MAX_HTML: Final = 1024 * 1024  # characters of an HTML part served into the frame
MAX_ATTACHMENTS: Final = 200
MAX_NAME: Final = 200
MAX_BULK: Final = 500  # copies one request may act on

_QUEUE_ID: Final = re.compile(r"[0-9a-hjkmnp-tv-z]{19}")

Action = Literal["release", "allow_release", "allow_list_release", "block", "delete"]
ACTIONS: Final[tuple[Action, ...]] = (
    "release",
    "allow_release",
    "allow_list_release",
    "block",
    "delete",
)

# ---------------------------------------------------------------- ids and scope


def parse_id(text: str) -> tuple[str, int]:
    """``<queue id>:<index>`` (or ``/``) from a form → (queue id, index); 404 for anything else."""
    qid, sep, idx = text.replace("/", ":").partition(":")
    if not sep or not _QUEUE_ID.fullmatch(qid) or not idx.isdigit() or len(idx) > 4:
        raise ApiError(404, "not_found", "no such held message")
    return qid, int(idx)


def _not_found() -> ApiError:
    return ApiError(404, "not_found", "no such held message")


def _user_tenant(services: Services, address: str) -> str | None:
    user = services.database.find_user(address)
    return None if user is None or user.address != address else user.tenant


def may_see_address(services: Services, p: Principal, address: str) -> bool:
    """May ``p`` see the mail and community of the user ``address``? (folded)."""
    if address == p.address:
        return True
    if not p.is_admin:
        return False
    tenant = _user_tenant(services, address)
    return tenant is not None and may_manage_tenant(p, tenant)


def find_held(services: Services, p: Principal, queue_id: str, rcpt_index: int) -> Held:
    """The held copy (queue id, index) if ``p`` may see its user; else 404 (`ApiError`)."""
    if not _QUEUE_ID.fullmatch(queue_id) or not 0 <= rcpt_index < 100_000:
        raise _not_found()
    rows = services.database.read(
        f"SELECT {HELD_COLUMNS} FROM quarantine WHERE queue_id = ? AND rcpt_index = ?",
        (queue_id, rcpt_index),
    )
    if not rows:
        raise _not_found()
    held = held_from_row(rows[0])
    if not may_see_address(services, p, held.user):
        raise _not_found()
    return held


def target_user(services: Services, p: Principal, user: str | None) -> str:
    """The user whose mail or community a request means: ``user`` if given and visible, else p's.

    404 for a user that does not exist or that ``p`` may not see (the same
    answer, so a user learns nothing of others' addresses).
    """
    if user is None or user == "":
        return p.address
    try:
        folded = fold_address(user)
    except InvalidError:
        raise ApiError(404, "not_found", "no such user") from None
    if not may_see_address(services, p, folded):
        raise ApiError(404, "not_found", "no such user")
    return folded


# ---------------------------------------------------------------- listing


@dataclass(frozen=True, slots=True)
class Search:
    """What a quarantine list is filtered by; times are Unix seconds (until: exclusive)."""

    sender: str = ""
    subject: str = ""
    since: int | None = None
    until: int | None = None


def list_held(
    services: Services, user: str, search: Search, *, limit: int, offset: int
) -> tuple[list[Held], int]:
    """One user's held copies matching ``search``, newest first, and how many match in all.

    The caller has checked that it may see ``user`` (`target_user`).
    """
    sql = "user = ?"
    params: list[object] = [user]
    if search.sender:
        sql += " AND (sender LIKE ? ESCAPE '\\' OR from_addr LIKE ? ESCAPE '\\')"
        params += [like_pattern(search.sender), like_pattern(search.sender)]
    if search.subject:
        sql += " AND subject LIKE ? ESCAPE '\\'"
        params.append(like_pattern(search.subject))
    if search.since is not None:
        sql += " AND held_at >= ?"
        params.append(search.since)
    if search.until is not None:
        sql += " AND held_at < ?"
        params.append(search.until)
    db = services.database
    total = cast(int, db.read(f"SELECT count(*) FROM quarantine WHERE {sql}", params)[0][0])
    rows = db.read(
        f"SELECT {HELD_COLUMNS} FROM quarantine WHERE {sql}"
        " ORDER BY held_at DESC, queue_id DESC, rcpt_index DESC LIMIT ? OFFSET ?",
        [*params, limit, offset],
    )
    return [held_from_row(r) for r in rows], total


# ---------------------------------------------------------------- text for people

# Bidirectional controls and other invisible formatting: shown as a visible
# marker, never obeyed (a file name "invoice\u202efdp.exe" must not read
# "invoiceexe.pdf").
_INVISIBLE: Final = frozenset(
    "\u061c\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\ufeff"
)


def visible(text: str, limit: int | None = None, *, lines: bool = False) -> str:
    """``text`` with invisible formatting and control characters made visible, bounded.

    ``lines``: keep newlines and tabs (a body); else one line (a name).
    """
    out: list[str] = []
    for c in text if limit is None else text[:limit]:
        if c in _INVISIBLE:
            out.append(f"[U+{ord(c):04X}]")
            continue
        cat = unicodedata.category(c)
        if cat == "Cc":
            if lines and c in "\n\t":
                out.append(c)
            elif c == "\r":
                continue
            else:
                out.append(" " if not lines else f"[U+{ord(c):04X}]")
        elif cat in ("Cf", "Cs", "Co"):
            out.append(f"[U+{ord(c):04X}]")
        else:
            out.append(c)
    s = "".join(out)
    if limit is not None and len(text) > limit:
        s += "…"
    return s


class _TextOfHtml(html.parser.HTMLParser):
    """The words of an HTML document, for showing it as plain text."""

    _SKIP: Final = frozenset({"script", "style", "head", "title"})
    _BREAK: Final = frozenset({"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "table"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip += 1
        elif tag in self._BREAK:
            self.parts.append("\n")
        elif tag == "a":
            href = dict(attrs).get("href") or ""
            if href:
                self.parts.append(f" [link: {href[:300]}] ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_as_text(doc: str) -> str:
    parser = _TextOfHtml()
    try:
        parser.feed(doc[:MAX_HTML])
        parser.close()
    except Exception:  # a parser error shows the source rather than nothing
        return doc[:MAX_TEXT]
    text = "".join(parser.parts)
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


_DEFUSE: Final = re.compile(r"<(\s*/?\s*)(meta|base|link)\b", re.IGNORECASE)


def defused_html(doc: str) -> str:
    """An HTML part for the sandboxed frame: ``<meta>``, ``<base>``, ``<link>`` made inert.

    The frame's CSP already forbids scripts and every load; this also stops
    a ``<meta http-equiv=refresh>`` from navigating the frame away.
    """
    return _DEFUSE.sub(lambda m: f"<{m[1]}x-{m[2]}", doc[:MAX_HTML])


# ---------------------------------------------------------------- one message


@dataclass(frozen=True, slots=True)
class Attachment:
    name: str  # visible(), bounded; "(no name)" when none
    content_type: str
    size: int  # decoded bytes


@dataclass(frozen=True, slots=True)
class MessageView:
    """What the message page shows of a held copy."""

    shown: Shown
    headers: str  # the header block, visible()
    text: str  # the plain text part, or the HTML part as text; visible()
    text_from_html: bool
    has_html: bool
    attachments: tuple[Attachment, ...]
    truncated: bool  # only the first MAX_PARSE bytes were read
    problem: str  # "" or why the body could not be shown


def _part_text(part: email.message.EmailMessage) -> str:
    try:
        content = part.get_content()
        if isinstance(content, str):
            return content
    except Exception:  # a lying charset, broken transfer encoding: fall back below
        pass
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode("utf-8", "replace")
    return ""


def _parse(raw: bytes) -> email.message.EmailMessage:
    parser = email.parser.BytesParser(policy=email.policy.default)
    return parser.parsebytes(raw)


def _read_raw(services: Services, queue_id: str) -> tuple[bytes, bool]:
    msg = services.spool.load_sync(queue_id, verify=False)
    with msg.open() as f:
        raw = f.read(MAX_PARSE + 1)
    return raw[:MAX_PARSE], len(raw) > MAX_PARSE


def _bodies(
    m: email.message.EmailMessage,
) -> tuple[str | None, str | None, list[Attachment]]:
    plain_part = m.get_body(preferencelist=("plain",))
    html_part = m.get_body(preferencelist=("html",))
    plain = _part_text(cast(email.message.EmailMessage, plain_part)) if plain_part else None
    html_text = _part_text(cast(email.message.EmailMessage, html_part)) if html_part else None
    attachments: list[Attachment] = []
    for part in m.walk():
        if len(attachments) >= MAX_ATTACHMENTS:
            break
        if part.is_multipart() or part is plain_part or part is html_part:
            continue
        try:
            name = part.get_filename()
        except Exception:
            name = None
        disposition = (part.get_content_disposition() or "").lower()
        if name is None and disposition != "attachment" and part.get_content_maintype() == "text":
            continue  # an alternative body part we do not show separately
        payload = part.get_payload(decode=True)
        size = len(payload) if isinstance(payload, bytes) else 0
        attachments.append(
            Attachment(
                visible(name, MAX_NAME) if name else "(no name)",
                visible(part.get_content_type(), 100),
                size,
            )
        )
    return plain, html_text, attachments


def read_message_sync(services: Services, held: Held) -> MessageView:
    """The message page's view of a held copy (blocking: run in a thread)."""
    try:
        shown = services.quarantine.show_sync(held.queue_id, held.rcpt_index, user=held.user)
    except NotHeldError:
        raise _not_found() from None
    problem = ""
    text, from_html, has_html, truncated = "", False, False, False
    attachments: list[Attachment] = []
    try:
        raw, truncated = _read_raw(services, held.queue_id)
        m = _parse(raw)
        plain, html_text, attachments = _bodies(m)
        has_html = html_text is not None
        if plain is not None:
            text = plain
        elif html_text is not None:
            text, from_html = html_as_text(html_text), True
    except (MessageNotFoundError, SpoolError):
        raise _not_found() from None
    except Exception as e:  # a message so broken that the parser gives up
        problem = f"the message's body could not be read ({type(e).__name__})"
    return MessageView(
        shown,
        visible(shown.headers, None, lines=True),
        visible(text, MAX_TEXT, lines=True),
        from_html,
        has_html,
        tuple(attachments),
        truncated,
        problem,
    )


async def read_message(services: Services, held: Held) -> MessageView:
    return await asyncio.to_thread(read_message_sync, services, held)


def html_part_sync(services: Services, held: Held) -> str | None:
    """The HTML part of a held copy, defused for the sandboxed frame; None when it has none."""
    try:
        raw, _ = _read_raw(services, held.queue_id)
        m = _parse(raw)
        part = m.get_body(preferencelist=("html",))
        if part is None:
            return None
        return defused_html(_part_text(cast(email.message.EmailMessage, part)))
    except (MessageNotFoundError, SpoolError):
        raise _not_found() from None
    except Exception:
        return None


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What one action did to one copy: ok, or an error code and a sentence."""

    queue_id: str
    rcpt_index: int
    ok: bool
    error: str = ""
    detail: str = ""
    entry: str = ""  # the community entry taught, for allow and block
    copies: int = 0  # copies released or deleted (allow and block may touch several)


def _act_one(
    services: Services, p: Principal, action: Action, queue_id: str, rcpt_index: int
) -> ActionResult:
    q = services.quarantine
    try:
        held = find_held(services, p, queue_id, rcpt_index)
    except ApiError as e:
        return ActionResult(queue_id, rcpt_index, False, e.code, e.detail)
    actor, admin, user = p.actor, p.is_admin, held.user
    core = services.core
    try:
        if action == "release":
            q.release_sync(queue_id, rcpt_index, actor=actor, admin=admin, user=user)
            return ActionResult(queue_id, rcpt_index, True, copies=1)
        if action == "delete":
            q.delete_sync(queue_id, rcpt_index, actor=actor, user=user)
            return ActionResult(queue_id, rcpt_index, True, copies=1)
        if action == "allow_release":
            taught = q.allow_release_sync(
                queue_id, rcpt_index, core=core, actor=actor, admin=admin, user=user
            )
        elif action == "allow_list_release":
            taught = q.allow_list_release_sync(
                queue_id, rcpt_index, core=core, actor=actor, admin=admin, user=user
            )
        else:
            taught = q.block_sync(
                queue_id, rcpt_index, core=core, actor=actor, admin=admin, user=user
            )
        return ActionResult(
            queue_id, rcpt_index, True, entry=taught.entry, copies=len(taught.copies)
        )
    except NotHeldError:
        return ActionResult(queue_id, rcpt_index, False, "not_found", "no such held message")
    except AdminOnlyError:
        return ActionResult(
            queue_id,
            rcpt_index,
            False,
            "admin_only",
            "held by the anti-virus layer: only an administrator may release it",
        )
    except NotLocalError:
        return ActionResult(
            queue_id,
            rcpt_index,
            False,
            "not_local",
            "its recipient's domain is no longer local, so it cannot be delivered",
        )
    except QuarantineError as e:
        return ActionResult(queue_id, rcpt_index, False, "refused", _reason_text(str(e)))


def _reason_text(message: str) -> str:
    # The quarantine's messages start with "<queue id>/<index>: "; what follows is for people.
    return message.split(": ", 1)[1] if ": " in message else message


def act_sync(
    services: Services, p: Principal, action: Action, ids: Sequence[tuple[str, int]]
) -> list[ActionResult]:
    """``action`` on each copy ``p`` may see (in order); an id it may not see is "not_found"."""
    results: list[ActionResult] = []
    done: set[tuple[str, int]] = set()
    for queue_id, rcpt_index in ids[:MAX_BULK]:
        if (queue_id, rcpt_index) in done:
            continue
        done.add((queue_id, rcpt_index))
        results.append(_act_one(services, p, action, queue_id, rcpt_index))
    return results


async def act(
    services: Services, p: Principal, action: Action, ids: Sequence[tuple[str, int]]
) -> list[ActionResult]:
    return await asyncio.to_thread(act_sync, services, p, action, list(ids))
