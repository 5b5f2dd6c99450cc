"""The JSON API under /api/v1, for scripts and provisioning: the user's half.

Everything the user's pages do, as JSON, described by the OpenAPI document
at /api/v1/openapi.json. Authenticated by the session cookie (state changes
then need ``X-CSRF-Token``) or by ``Authorization: Bearer <API token>``;
the isolation rules are the pages': a principal reaches only the mail and
community of users it may see (`kithmail.web.mail.may_see_address`: itself;
an admin also its tenant's users, a global admin everyone's), whatever ids
or addresses a URL, a query or a body names — another user's message is
the same 404 as a message that does not exist. Errors are
``{"error": code, "detail": text}`` with a 4xx status.

Most calls take an optional ``user`` (an address): the user whose
quarantine or community is meant, by default the caller's own.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from kithmail.quarantine import Held
from kithmail.web import account, community
from kithmail.web.auth import COOKIE, Principal, principal, services_of
from kithmail.web.errors import ApiError
from kithmail.web.mail import (
    MAX_BULK,
    Action,
    ActionResult,
    act,
    find_held,
    list_held,
    read_message,
    target_user,
    visible,
)
from kithmail.web.security import csrf, is_https
from kithmail.web.user import sav_text, search_from, why_held

__all__ = ["router"]

_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"description": "Not logged in and no valid API token"},
    403: {"description": "A missing CSRF token, or not allowed"},
    404: {"description": "No such thing (or not yours)"},
    422: {"description": "Invalid input"},
}
router = APIRouter(prefix="/api/v1", tags=["user"], responses=_ERRORS)

User = Annotated[Principal, Depends(principal)]
Csrf = Depends(csrf)
QueueId = Annotated[str, Path(pattern=r"^[0-9a-hjkmnp-tv-z]{19}$", description="The queue id")]
RcptIndex = Annotated[int, Path(ge=0, le=99_999, description="The recipient's index")]
UserParam = Annotated[
    str | None, Query(max_length=320, description="Whose (an address); default: yours")
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Me(_Model):
    """Who the request acts for."""

    address: str
    tenant: str
    role: str
    via: str


class HeldOut(_Model):
    """One held copy of a message."""

    queue_id: str
    rcpt_index: int
    user: str
    sender: str = Field(description="The envelope sender ('' for the null sender)")
    from_addr: str = Field(description="The header From address")
    subject: str
    date: str = Field(description="The Date header as written")
    size: int
    layer: str = Field(description="The layer that held it")
    reason: str = Field(description="Its stable reason code, e.g. community.unknown")
    why: str = Field(description="The reason in words")
    detail: str
    sav: str = Field(description="The SAV state code ('' when none)")
    sav_text: str
    held_at: int = Field(description="Unix seconds")
    expires_at: int = Field(description="Unix seconds: deleted then")
    admin_only: bool = Field(description="Held by the anti-virus layer: admins release it")


def _held_out(h: Held) -> HeldOut:
    return HeldOut(
        queue_id=h.queue_id,
        rcpt_index=h.rcpt_index,
        user=h.user,
        sender=h.sender,
        from_addr=h.from_addr,
        subject=h.subject,
        date=h.date,
        size=h.size,
        layer=h.layer,
        reason=h.reason,
        why=why_held(h),
        detail=h.detail,
        sav=h.sav,
        sav_text=sav_text(h.sav),
        held_at=h.held_at,
        expires_at=h.expires_at,
        admin_only=h.admin_only,
    )


class HeldPage(_Model):
    items: list[HeldOut]
    total: int = Field(description="How many match in all")
    limit: int
    offset: int


class VerdictOut(_Model):
    layer: str
    action: str
    reason: str
    detail: str


class AttachmentOut(_Model):
    name: str
    content_type: str
    size: int


class MessageOut(_Model):
    """A held copy in full: the row, the envelope, every verdict, headers, text, attachments."""

    held: HeldOut
    recipient: str
    mail_from: str
    client_ip: str
    helo: str
    verdicts: list[VerdictOut]
    headers: str
    text: str = Field(description="The plain text part (or the HTML part as text)")
    text_from_html: bool
    has_html: bool
    attachments: list[AttachmentOut]
    truncated: bool


class ActionIn(_Model):
    action: Action
    items: list[Annotated[tuple[str, int], Field()]] = Field(
        max_length=MAX_BULK, description="[queue_id, rcpt_index] pairs"
    )


class ActionOut(_Model):
    queue_id: str
    rcpt_index: int
    ok: bool
    error: str = Field(description="'' when ok; not_found, admin_only, not_local, refused")
    detail: str
    entry: str = Field(description="The community entry taught (allow and block)")
    copies: int = Field(description="Copies released or deleted")


class ActionsOut(_Model):
    results: list[ActionOut]
    done: int
    failed: int


def _action_out(r: ActionResult) -> ActionOut:
    return ActionOut(
        queue_id=r.queue_id,
        rcpt_index=r.rcpt_index,
        ok=r.ok,
        error=r.error,
        detail=r.detail,
        entry=r.entry,
        copies=r.copies,
    )


class EntryOut(_Model):
    entry: str
    kind: Literal["allow", "block"]
    source: str = Field(description="manual, import, admin, outbound, sav, journal")
    added: int = Field(description="Unix seconds")


class EntryIn(_Model):
    entry: str = Field(min_length=1, max_length=400, description="address, @domain or list:<id>")
    kind: Literal["allow", "block"] = "allow"


class EntryChange(_Model):
    entry: str = Field(description="As stored (folded)")
    changed: bool


class ImportIn(_Model):
    csv: str = Field(description="The CSV text: the first column is the entry")
    kind: Literal["allow", "block"] = "allow"


class ImportOut(_Model):
    entries: int
    changed: int


class PasswordIn(_Model):
    current: str = Field(max_length=1024)
    new: str = Field(max_length=1024)


class Prefs(_Model):
    digest: bool = Field(description="Send me the daily quarantine digest")


class Ok(_Model):
    ok: bool = True


# ---------------------------------------------------------------- who


@router.get("/me", response_model=Me, summary="Who am I")
async def me(p: User) -> Me:
    return Me(address=p.address, tenant=p.tenant, role=p.role, via=p.via)


# ---------------------------------------------------------------- the quarantine


@router.get("/quarantine", response_model=HeldPage, summary="List held mail, newest first")
async def quarantine_list(
    request: Request,
    p: User,
    user: UserParam = None,
    sender: Annotated[str, Query(max_length=200, description="Part of the sender")] = "",
    subject: Annotated[str, Query(max_length=200, description="Part of the subject")] = "",
    since: Annotated[str, Query(max_length=10, description="YYYY-MM-DD (UTC), from")] = "",
    until: Annotated[str, Query(max_length=10, description="YYYY-MM-DD (UTC), to, inclusive")] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> HeldPage:
    services = services_of(request)
    who = target_user(services, p, user)
    search, error = search_from(sender, subject, since, until)
    if error:
        raise ApiError(422, "invalid", "since and until are dates, YYYY-MM-DD")
    rows, total = await asyncio.to_thread(
        list_held, services, who, search, limit=limit, offset=offset
    )
    return HeldPage(items=[_held_out(h) for h in rows], total=total, limit=limit, offset=offset)


@router.get(
    "/quarantine/{queue_id}/{rcpt_index}",
    response_model=MessageOut,
    summary="One held message: headers, text, attachments",
)
async def quarantine_show(
    request: Request, p: User, queue_id: QueueId, rcpt_index: RcptIndex
) -> MessageOut:
    services = services_of(request)
    held = find_held(services, p, queue_id, rcpt_index)
    m = await read_message(services, held)
    s = m.shown
    return MessageOut(
        held=_held_out(s.held),
        recipient=s.recipient,
        mail_from=s.mail_from,
        client_ip=s.client_ip,
        helo=visible(s.helo, 254),
        verdicts=[
            VerdictOut(layer=str(v.layer), action=str(v.action), reason=v.reason, detail=v.detail)
            for v in s.verdicts
        ],
        headers=m.headers,
        text=m.text,
        text_from_html=m.text_from_html,
        has_html=m.has_html,
        attachments=[
            AttachmentOut(name=a.name, content_type=a.content_type, size=a.size)
            for a in m.attachments
        ],
        truncated=m.truncated,
    )


_ACTION_PATHS: dict[str, Action] = {
    "release": "release",
    "allow-release": "allow_release",
    "allow-list-release": "allow_list_release",
    "block": "block",
    "delete": "delete",
}


@router.post(
    "/quarantine/{queue_id}/{rcpt_index}/{action}",
    response_model=ActionOut,
    dependencies=[Csrf],
    summary="Release, allow sender + release, allow list + release, block or delete one copy",
)
async def quarantine_act_one(
    request: Request,
    p: User,
    queue_id: QueueId,
    rcpt_index: RcptIndex,
    action: Annotated[
        Literal["release", "allow-release", "allow-list-release", "block", "delete"], Path()
    ],
) -> ActionOut:
    (r,) = await act(services_of(request), p, _ACTION_PATHS[action], [(queue_id, rcpt_index)])
    if not r.ok:
        status = {"not_found": 404, "admin_only": 403}.get(r.error, 409)
        raise ApiError(status, r.error, r.detail)
    return _action_out(r)


@router.post(
    "/quarantine/actions",
    response_model=ActionsOut,
    dependencies=[Csrf],
    summary="One action on several held copies; each result said",
)
async def quarantine_act_many(request: Request, p: User, body: ActionIn) -> ActionsOut:
    results = await act(services_of(request), p, body.action, body.items)
    done = sum(1 for r in results if r.ok)
    return ActionsOut(
        results=[_action_out(r) for r in results], done=done, failed=len(results) - done
    )


# ---------------------------------------------------------------- the community


@router.get("/community", response_model=list[EntryOut], summary="Allowed and blocked entries")
async def community_list(request: Request, p: User, user: UserParam = None) -> list[EntryOut]:
    services = services_of(request)
    who = target_user(services, p, user)
    items = await asyncio.to_thread(community.entries, services, who)
    return [
        EntryOut(
            entry=e.entry,
            kind="block" if e.kind == "block" else "allow",
            source=e.source,
            added=e.added,
        )
        for e in items
    ]


@router.post(
    "/community",
    response_model=EntryChange,
    dependencies=[Csrf],
    summary="Add an entry (or move it between allow and block)",
)
async def community_add(
    request: Request, p: User, body: EntryIn, user: UserParam = None
) -> EntryChange:
    services = services_of(request)
    who = target_user(services, p, user)
    try:
        changed, folded = await asyncio.to_thread(
            community.add, services, p, who, body.entry, body.kind
        )
    except community.EntryError as e:
        raise ApiError(422, "invalid", str(e)) from None
    return EntryChange(entry=folded, changed=changed)


@router.delete(
    "/community",
    response_model=EntryChange,
    dependencies=[Csrf],
    summary="Remove an entry",
)
async def community_remove(
    request: Request,
    p: User,
    entry: Annotated[str, Query(min_length=1, max_length=400)],
    user: UserParam = None,
) -> EntryChange:
    services = services_of(request)
    who = target_user(services, p, user)
    try:
        folded = await asyncio.to_thread(community.remove, services, p, who, entry)
    except community.EntryError as e:
        raise ApiError(404, "not_found", str(e)) from None
    return EntryChange(entry=folded, changed=True)


@router.post(
    "/community/import",
    response_model=ImportOut,
    dependencies=[Csrf],
    summary="Import a CSV (all or nothing; every bad line named)",
)
async def community_import(
    request: Request, p: User, body: ImportIn, user: UserParam = None
) -> ImportOut:
    services = services_of(request)
    who = target_user(services, p, user)
    data = body.csv.encode()
    limit = services.settings().web.max_upload
    if len(data) > limit:
        raise ApiError(413, "too_large", f"the CSV is larger than {limit} bytes")
    try:
        parsed = community.parse_csv(data)
    except community.CsvError as e:
        raise ApiError(422, "invalid", " ".join(e.errors)) from None
    changed = await asyncio.to_thread(community.import_entries, services, p, who, parsed, body.kind)
    return ImportOut(entries=len(parsed), changed=changed)


@router.get(
    "/community/export",
    summary="Export as CSV (entry, kind, source, added)",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}},
)
async def community_export(request: Request, p: User, user: UserParam = None) -> Response:
    services = services_of(request)
    who = target_user(services, p, user)
    items = await asyncio.to_thread(community.entries, services, who)
    return Response(
        community.to_csv(items),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="community.csv"'},
    )


# ---------------------------------------------------------------- the account


@router.post(
    "/account/password",
    response_model=Ok,
    dependencies=[Csrf],
    summary="Change my password (ends every session)",
)
async def account_password(request: Request, response: Response, p: User, body: PasswordIn) -> Ok:
    try:
        secret = await account.change_password(
            request, p, body.current, body.new, fresh_session=p.via == "session"
        )
    except account.PasswordError as e:
        raise ApiError(e.status, e.code, e.detail) from None
    if p.via == "session":
        # Every session ended; the browser that asked gets a fresh one.
        response.set_cookie(
            COOKIE,
            secret,
            path="/",
            httponly=True,
            samesite="lax",
            secure=is_https(request),
        )
    return Ok()


@router.get("/account/prefs", response_model=Prefs, summary="My preferences")
async def prefs_get(request: Request, p: User) -> Prefs:
    db = services_of(request).database
    return Prefs(digest=await asyncio.to_thread(account.digest_enabled, db, p.user_id))


@router.put(
    "/account/prefs", response_model=Prefs, dependencies=[Csrf], summary="Set my preferences"
)
async def prefs_put(request: Request, p: User, body: Annotated[Prefs, Body()]) -> Prefs:
    db = services_of(request).database
    await asyncio.to_thread(account.set_digest, db, p.user_id, body.digest, actor=p.actor)
    return body
