"""The user's pages: log in and out, the quarantine, the community, the account.

Every page but /login needs a session (`kithmail.web.auth.principal`);
every form that changes something posts the session's CSRF token
(`kithmail.web.security.csrf`). A page acts for its principal only: the
quarantine and community shown are the principal's own, and a message is
found by (queue id, recipient index) *and* the principal's right to see
its user (`kithmail.web.mail`), so an id typed into a URL or a form opens
nothing of anyone else's — the answer is the same 404 as for an id that
does not exist.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
from typing import Annotated, Final, cast
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from kithmail.db import InvalidError, fold_address
from kithmail.quarantine import Held
from kithmail.web import account, community
from kithmail.web.auth import (
    COOKIE,
    LoginLimiter,
    Principal,
    create_session,
    end_session,
    optional_principal,
    principal,
    services_of,
)
from kithmail.web.errors import ApiError
from kithmail.web.mail import (
    ACTIONS,
    MAX_BULK,
    Search,
    act,
    find_held,
    html_part_sync,
    list_held,
    parse_id,
    read_message,
    visible,
)
from kithmail.web.security import (
    CSP_SANDBOXED_HTML,
    CSP_WITH_FRAME,
    csrf,
    is_https,
    login_csrf_ok,
)
from kithmail.web.templating import render

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

LOGIN_COOKIE: Final = "kith_login"
MAX_ADDRESS: Final = 320
MAX_PASSWORD: Final = 1024

User = Annotated[Principal, Depends(principal)]
Csrf = Depends(csrf)


def _secure(request: Request) -> bool:
    return is_https(request)


def safe_next(target: str | None) -> str:
    """A local path to go to after login; anything else (another site) is the start page."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or any(ord(c) < 0x20 for c in target)
        or len(target) > 2000
    ):
        return "/quarantine"
    return target


def _login_page(
    request: Request,
    *,
    status: int = 200,
    error: str = "",
    info: str = "",
    address: str = "",
    next_: str = "",
) -> Response:
    token = secrets.token_urlsafe(24)
    response = render(
        request,
        "login.html",
        {
            "error": error,
            "info": info,
            "address": address[:MAX_ADDRESS],
            "next": safe_next(next_),
            "login_csrf": token,
        },
        status,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=3600,
        path="/login",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    return response


@router.get("/")
async def start(request: Request) -> Response:
    p = await optional_principal(request)
    return RedirectResponse("/quarantine" if p is not None else "/login", status_code=303)


@router.get("/login")
async def login_form(request: Request, next: str = "", bye: int = 0) -> Response:
    p = await optional_principal(request)
    info = "You are logged out." if bye else ""
    if p is not None:
        # Logging in again (as someone else, perhaps) ends this session.
        info = f"You are logged in as {p.address}. Logging in again ends that session."
    return _login_page(request, next_=next, info=info)


def _client_ip(request: Request) -> str:
    return request.client.host if request.client is not None else "?"


@router.post("/login")
async def login(
    request: Request,
    address: Annotated[str, Form(max_length=MAX_ADDRESS)] = "",
    password: Annotated[str, Form(max_length=MAX_PASSWORD)] = "",
    login_csrf: Annotated[str, Form(max_length=100)] = "",
    next: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    services = services_of(request)
    web = services.settings().web
    address = address.strip()
    if not await login_csrf_ok(request, request.cookies.get(LOGIN_COOKIE, ""), login_csrf):
        return _login_page(
            request,
            status=403,
            error="This login form has expired or came from elsewhere. Please try again.",
            address=address,
            next_=next,
        )
    limiter: LoginLimiter = request.app.state.login_limiter
    ip = _client_ip(request)
    try:
        # One account, however it is spelt (case, Unicode or A-label domain).
        account = fold_address(address)
    except InvalidError:
        account = address.lower()
    wait = limiter.blocked(
        ip,
        account,
        window=web.login_window,
        per_ip=web.login_failures_per_ip,
        per_account=web.login_failures_per_account,
    )
    if wait > 0:
        minutes = max(1, int(wait + 59) // 60)
        response = _login_page(
            request,
            status=429,
            error=f"Too many failed logins. Please wait {minutes} minute"
            f"{'s' if minutes != 1 else ''} and try again.",
            address=address,
            next_=next,
        )
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    user = await asyncio.to_thread(services.database.verify_password, address, password)
    if user is None:
        limiter.failed(ip, account)
        return _login_page(
            request,
            status=401,
            error="Wrong mail address or password.",
            address=address,
            next_=next,
        )
    limiter.succeeded(account)
    old = request.cookies.get(COOKIE)
    now = int(services.clock())

    def rotate() -> tuple[str, str]:
        # A new session id at every login; whatever session the browser had ends.
        if old:
            end_session(services.database, old)
        return create_session(services.database, user, now=now, ttl_s=web.session_ttl)

    secret, _token = await asyncio.to_thread(rotate)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        COOKIE,
        secret,
        path="/",
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout", dependencies=[Csrf])
async def logout(request: Request, p: User) -> Response:
    secret = request.cookies.get(COOKIE, "")
    if secret:
        await asyncio.to_thread(end_session, services_of(request).database, secret)
    response = RedirectResponse("/login?" + urlencode({"bye": 1}), status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="lax")
    return response


# ---------------------------------------------------------------- the quarantine

PAGE_SIZE: Final = 50
MAX_SEARCH: Final = 200

_DONE: Final = {
    "release": "Released {n}: on the way to the mailbox.",
    "allow_release": "Allowed the sender and released {n}.",
    "allow_list_release": "Allowed the mailing list and released {n}.",
    "block": "Blocked the sender and deleted {n}.",
    "delete": "Deleted {n}.",
}
_FAILED: Final = {
    "admin_only": "held by the anti-virus layer: only an administrator may release it",
    "not_found": "not found (released or deleted meanwhile?)",
    "not_local": "its domain is no longer local",
    "refused": "there was no sender (or mailing list) to allow or block",
    "none": "no message was selected",
    "bad_action": "unknown action",
}


def parse_day(text: str, *, end: bool = False) -> int | None:
    """``YYYY-MM-DD`` (UTC) → Unix seconds of its start (``end``: of the next day); None if empty.

    ValueError for anything else.
    """
    text = text.strip()
    if not text:
        return None
    day = datetime.datetime.strptime(text[:10], "%Y-%m-%d").replace(tzinfo=datetime.UTC)
    if len(text) != 10:
        raise ValueError(text)
    if end:
        day += datetime.timedelta(days=1)
    return int(day.timestamp())


def search_from(sender: str, subject: str, since: str, until: str) -> tuple[Search, str]:
    """The search a form or query asked for, and an error sentence ("" when fine)."""
    error = ""
    try:
        t0 = parse_day(since)
    except ValueError:
        t0, error = None, "Dates are written YYYY-MM-DD."
    try:
        t1 = parse_day(until, end=True)
    except ValueError:
        t1, error = None, "Dates are written YYYY-MM-DD."
    return Search(sender.strip()[:MAX_SEARCH], subject.strip()[:MAX_SEARCH], t0, t1), error


@router.get("/quarantine")
async def quarantine_page(
    request: Request,
    p: User,
    sender: Annotated[str, Query(max_length=MAX_SEARCH)] = "",
    subject: Annotated[str, Query(max_length=MAX_SEARCH)] = "",
    since: Annotated[str, Query(max_length=20)] = "",
    until: Annotated[str, Query(max_length=20)] = "",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    done: Annotated[str, Query(max_length=30)] = "",
    n: Annotated[int, Query(ge=0, le=100_000)] = 0,
    failed: Annotated[int, Query(ge=0, le=100_000)] = 0,
    why: Annotated[str, Query(max_length=30)] = "",
) -> Response:
    services = services_of(request)
    search, error = search_from(sender, subject, since, until)
    rows, total = await asyncio.to_thread(
        list_held, services, p.address, search, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE
    )
    notice = ""
    if done in _DONE:
        notice = _DONE[done].format(n=f"{n} message{'s' if n != 1 else ''}")
    problem = ""
    if failed:
        problem = f"{failed} could not be done: {_FAILED.get(why, 'refused')}."
    query = {
        k: v
        for k, v in (("sender", sender), ("subject", subject), ("since", since), ("until", until))
        if v
    }
    pages = max(1, (total + PAGE_SIZE - 1) // PAGE_SIZE)
    return render(
        request,
        "quarantine.html",
        {
            "title": "Quarantine",
            "rows": [row_view(h) for h in rows],
            "total": total,
            "page": page,
            "pages": pages,
            "prev_url": f"/quarantine?{urlencode({**query, 'page': page - 1})}" if page > 1 else "",
            "next_url": f"/quarantine?{urlencode({**query, 'page': page + 1})}"
            if page < pages
            else "",
            "search": {"sender": sender, "subject": subject, "since": since, "until": until},
            "searching": bool(query),
            "back": "/quarantine?" + urlencode({**query, "page": page}),
            "notice": notice,
            "error": error or problem,
        },
    )


_REASONS: Final = (
    ("community.", "The sender is not in your community yet"),
    ("antivirus.", "A virus or dangerous content was found"),
    ("spf.", "The sender's domain did not authorise the sending server (SPF)"),
    ("dkim.", "The message's signature did not verify (DKIM)"),
    ("dmarc.", "The sender's domain asks for mail like this to be held (DMARC)"),
    ("spoofing.", "It claims to come from one of our own domains"),
    ("reputation.", "The sending server has a poor reputation"),
    ("recon.", "The sending server is new to us"),
)
_SAV: Final = {
    "": "",
    "sav.challenge": "Sender asked to confirm",
    "sav.verified": "Sender confirmed",
    "sav.disabled": "No confirmation asked (turned off)",
    "sav.null_sender": "No confirmation asked (no sender)",
    "sav.bad_sender": "No confirmation asked (invalid sender)",
    "sav.bulk": "No confirmation asked (bulk or list mail)",
    "sav.own_domain": "No confirmation asked (our own domain)",
    "sav.unauthenticated": "No confirmation asked (sender not authenticated)",
    "sav.interval": "No confirmation asked (asked recently)",
    "sav.rate_domain": "No confirmation asked (rate limit)",
    "sav.rate_global": "No confirmation asked (rate limit)",
}


def why_held(h: Held) -> str:
    for prefix, text in _REASONS:
        if h.reason.startswith(prefix):
            return text
    return "Held by policy"


def sav_text(code: str) -> str:
    return _SAV.get(code, code)


def row_view(h: Held) -> dict[str, object]:
    """One quarantine row for a template: every string visible() (escaping is Jinja's)."""
    return {
        "id": f"{h.queue_id}:{h.rcpt_index}",
        "href": f"/quarantine/{h.queue_id}/{h.rcpt_index}",
        "sender": visible(h.sender or "<>", 254),
        "from_addr": visible(h.from_addr, 254),
        "subject": visible(h.subject, 200) or "(no subject)",
        "held_at": h.held_at,
        "expires_at": h.expires_at,
        "date": visible(h.date, 64),
        "size": h.size,
        "layer": h.layer,
        "reason": h.reason,
        "why": why_held(h),
        "detail": visible(h.detail, 300),
        "sav": sav_text(h.sav),
        "admin_only": h.admin_only,
        "user": h.user,
    }


def _message_csp(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP_WITH_FRAME
    return response


@router.get("/quarantine/{queue_id}/{rcpt_index}")
async def message_page(
    request: Request,
    p: User,
    queue_id: Annotated[str, Path(max_length=40)],
    rcpt_index: Annotated[int, Path(ge=0, le=99_999)],
    view: Annotated[str, Query(max_length=10)] = "text",
) -> Response:
    services = services_of(request)
    held = find_held(services, p, queue_id, rcpt_index)
    message = await read_message(services, held)
    frame = view == "html" and message.has_html
    response = render(
        request,
        "message.html",
        {
            "title": visible(held.subject, 80) or "(no subject)",
            "row": row_view(held),
            "m": message,
            "verdicts": [
                {
                    "layer": str(v.layer),
                    "action": str(v.action),
                    "reason": v.reason,
                    "detail": visible(v.detail, 500),
                }
                for v in message.shown.verdicts
            ],
            "recipient": visible(message.shown.recipient, 254),
            "mail_from": visible(message.shown.mail_from or "<>", 254),
            "client_ip": message.shown.client_ip,
            "helo": visible(message.shown.helo, 254),
            "frame": frame,
            "frame_src": f"/quarantine/{held.queue_id}/{held.rcpt_index}/html",
            "back": "/quarantine",
        },
    )
    return _message_csp(response) if frame else response


@router.get("/quarantine/{queue_id}/{rcpt_index}/html")
async def message_html(
    request: Request,
    p: User,
    queue_id: Annotated[str, Path(max_length=40)],
    rcpt_index: Annotated[int, Path(ge=0, le=99_999)],
) -> Response:
    """The HTML part alone, for the sandboxed frame: no script, nothing loaded."""
    services = services_of(request)
    held = find_held(services, p, queue_id, rcpt_index)
    doc = await asyncio.to_thread(html_part_sync, services, held)
    if doc is None:
        raise ApiError(404, "not_found", "this message has no HTML part")
    return HTMLResponse(
        doc,
        headers={
            "Content-Security-Policy": CSP_SANDBOXED_HTML,
            "X-Frame-Options": "SAMEORIGIN",
        },
    )


@router.post("/quarantine/act", dependencies=[Csrf])
async def quarantine_act(
    request: Request,
    p: User,
    action: Annotated[str, Form(max_length=30)] = "",
    id: Annotated[list[str] | None, Form()] = None,
    back: Annotated[str, Form(max_length=2000)] = "/quarantine",
) -> Response:
    ids_text = (id or [])[:MAX_BULK]
    target = safe_next(back) if back.startswith("/quarantine") else "/quarantine"
    base, _, query = target.partition("?")
    if base != "/quarantine":
        base, query = "/quarantine", ""  # after acting, the message page is gone
    params = {
        k: v for k, v in parse_qsl(query) if k in ("sender", "subject", "since", "until", "page")
    }
    if action not in ACTIONS:
        params.update(failed="1", why="bad_action")
        return RedirectResponse(f"{base}?{urlencode(params)}", status_code=303)
    if not ids_text:
        params.update(failed="1", why="none")
        return RedirectResponse(f"{base}?{urlencode(params)}", status_code=303)
    ids: list[tuple[str, int]] = []
    bad = 0
    for text in ids_text:
        try:
            ids.append(parse_id(text[:40]))
        except ApiError:
            bad += 1
    results = await act(services_of(request), p, action, ids)
    ok = sum(r.copies for r in results if r.ok)
    failures = [r for r in results if not r.ok]
    params.update(done=action, n=str(ok))
    if failures or bad:
        params.update(
            failed=str(len(failures) + bad), why=failures[0].error if failures else "not_found"
        )
    return RedirectResponse(f"{base}?{urlencode(params)}", status_code=303)


# ---------------------------------------------------------------- the community


@router.get("/community")
async def community_page(
    request: Request,
    p: User,
    done: Annotated[str, Query(max_length=30)] = "",
    entry: Annotated[str, Query(max_length=400)] = "",
    n: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    of: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> Response:
    services = services_of(request)
    entries = await asyncio.to_thread(community.entries, services, p.address)
    notices = {
        "added": f"Added {entry}.",
        "unchanged": f"{entry} was already there.",
        "removed": f"Removed {entry}.",
        "imported": f"Imported {of} entries: {n} new or changed, {of - n} already there.",
    }
    return render(
        request,
        "community.html",
        {
            "title": "Community",
            "allowed": [e for e in entries if e.kind == "allow"],
            "blocked": [e for e in entries if e.kind == "block"],
            "notice": notices.get(done, ""),
            "error": "",
            "errors": [],
            "max_upload": services.settings().web.max_upload,
        },
    )


async def _community_error(
    request: Request, p: Principal, error: str, errors: list[str], status: int
) -> Response:
    services = services_of(request)
    entries = await asyncio.to_thread(community.entries, services, p.address)
    return render(
        request,
        "community.html",
        {
            "title": "Community",
            "allowed": [e for e in entries if e.kind == "allow"],
            "blocked": [e for e in entries if e.kind == "block"],
            "notice": "",
            "error": error,
            "errors": errors,
            "max_upload": services.settings().web.max_upload,
        },
        status,
    )


@router.post("/community/add", dependencies=[Csrf])
async def community_add(
    request: Request,
    p: User,
    entry: Annotated[str, Form(max_length=400)] = "",
    kind: Annotated[str, Form(max_length=10)] = "allow",
) -> Response:
    if kind not in ("allow", "block"):
        return await _community_error(request, p, "Choose allow or block.", [], 400)
    services = services_of(request)
    try:
        added, folded = await asyncio.to_thread(
            community.add, services, p, p.address, entry, cast(community.Kind, kind)
        )
    except community.EntryError as e:
        return await _community_error(request, p, str(e), [], 400)
    done = "added" if added else "unchanged"
    return RedirectResponse(
        f"/community?{urlencode({'done': done, 'entry': folded})}", status_code=303
    )


@router.post("/community/remove", dependencies=[Csrf])
async def community_remove(
    request: Request,
    p: User,
    entry: Annotated[str, Form(max_length=400)] = "",
) -> Response:
    services = services_of(request)
    try:
        folded = await asyncio.to_thread(community.remove, services, p, p.address, entry)
    except community.EntryError as e:
        return await _community_error(request, p, str(e), [], 404)
    return RedirectResponse(
        f"/community?{urlencode({'done': 'removed', 'entry': folded})}", status_code=303
    )


@router.post("/community/import", dependencies=[Csrf])
async def community_import(
    request: Request,
    p: User,
    file: Annotated[UploadFile | None, File()] = None,
    kind: Annotated[str, Form(max_length=10)] = "allow",
) -> Response:
    services = services_of(request)
    if kind not in ("allow", "block"):
        return await _community_error(request, p, "Choose allow or block.", [], 400)
    limit = services.settings().web.max_upload
    if file is None:
        return await _community_error(request, p, "Choose a CSV file to import.", [], 400)
    data = await file.read(limit + 1)
    if len(data) > limit:
        return await _community_error(
            request, p, f"The file is larger than {limit} bytes.", [], 413
        )
    try:
        parsed = community.parse_csv(data)
    except community.CsvError as e:
        return await _community_error(request, p, "Nothing was imported.", e.errors, 400)
    changed = await asyncio.to_thread(
        community.import_entries, services, p, p.address, parsed, cast(community.Kind, kind)
    )
    return RedirectResponse(
        f"/community?{urlencode({'done': 'imported', 'n': changed, 'of': len(parsed)})}",
        status_code=303,
    )


@router.get("/community/export.csv")
async def community_export(request: Request, p: User) -> Response:
    services = services_of(request)
    entries = await asyncio.to_thread(community.entries, services, p.address)
    return Response(
        community.to_csv(entries),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="community.csv"'},
    )


# ---------------------------------------------------------------- the account


@router.get("/account")
async def account_page(
    request: Request,
    p: User,
    done: Annotated[str, Query(max_length=30)] = "",
) -> Response:
    services = services_of(request)
    digest = await asyncio.to_thread(account.digest_enabled, services.database, p.user_id)
    notices = {
        "password": "Your password is changed. Every other session has ended.",
        "digest_on": "You will get the daily digest.",
        "digest_off": "You will no longer get the daily digest.",
    }
    return render(
        request,
        "account.html",
        {"title": "Account", "digest": digest, "notice": notices.get(done, ""), "error": ""},
    )


@router.post("/account/password", dependencies=[Csrf])
async def account_password(
    request: Request,
    p: User,
    current: Annotated[str, Form(max_length=MAX_PASSWORD)] = "",
    new: Annotated[str, Form(max_length=MAX_PASSWORD)] = "",
    confirm: Annotated[str, Form(max_length=MAX_PASSWORD)] = "",
) -> Response:
    services = services_of(request)

    async def again(error: str, status: int) -> Response:
        digest = await asyncio.to_thread(account.digest_enabled, services.database, p.user_id)
        return render(
            request,
            "account.html",
            {"title": "Account", "digest": digest, "notice": "", "error": error},
            status,
        )

    if new != confirm:
        return await again("The new password and its confirmation differ.", 400)
    try:
        secret = await account.change_password(request, p, current, new)
    except account.PasswordError as e:
        return await again(e.detail, e.status)
    response = RedirectResponse("/account?done=password", status_code=303)
    response.set_cookie(
        COOKIE, secret, path="/", httponly=True, samesite="lax", secure=_secure(request)
    )
    return response


@router.post("/account/digest", dependencies=[Csrf])
async def account_digest(
    request: Request,
    p: User,
    digest: Annotated[str, Form(max_length=5)] = "",
) -> Response:
    on = digest == "on"
    await asyncio.to_thread(
        account.set_digest, services_of(request).database, p.user_id, on, actor=p.actor
    )
    return RedirectResponse(f"/account?done={'digest_on' if on else 'digest_off'}", status_code=303)
