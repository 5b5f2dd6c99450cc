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
import secrets
from typing import Annotated, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

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
from kithmail.web.security import csrf, login_csrf_ok
from kithmail.web.templating import render

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

LOGIN_COOKIE: Final = "kith_login"
MAX_ADDRESS: Final = 320
MAX_PASSWORD: Final = 1024

User = Annotated[Principal, Depends(principal)]
Csrf = Depends(csrf)


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


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
    if await optional_principal(request) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, next_=next, info="You are logged out." if bye else "")


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
