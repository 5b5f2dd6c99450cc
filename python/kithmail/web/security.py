"""What every answer of the web listener carries, and what every change must prove.

`SecurityHeaders` (ASGI middleware) puts on every response — pages, the
API, errors, 404s, static files — a Content-Security-Policy that allows
scripts, styles and images from this origin only (no inline script, no
eval, no framing by anyone: `CSP`), ``X-Frame-Options: DENY``,
``X-Content-Type-Options: nosniff``, ``Referrer-Policy: same-origin`` and
``Cache-Control: no-store`` (static files excepted). A response that sets
its own policy keeps it: the message page adds ``frame-src 'self'`` for its
sandboxed frame (`CSP_WITH_FRAME`), and the frame's document gets
`CSP_SANDBOXED_HTML`, which runs no script and loads nothing at all.

`csrf` is the dependency of every state-changing route. A request
authenticated by the session cookie — which a browser attaches by itself,
whoever made it send the request — must carry the session's CSRF token (form
field ``csrf`` or header ``X-CSRF-Token``), must not say it comes from
another site (``Sec-Fetch-Site: cross-site``), and when it names an
``Origin`` (or, without one, a ``Referer``) that must be this listener's
own. A bearer-token request is exempt: a browser never sends that header
on its own. The login form, before any session, is guarded the same way
by a token bound to a pre-login cookie (`login_csrf_ok`).

Trusts: nothing of the request; the token is compared in constant time.
Standards: W3C CSP Level 3, RFC 7034 (X-Frame-Options), RFC 6454 (Origin),
Fetch Metadata Request Headers, OWASP's CSRF prevention (synchroniser token).
"""

from __future__ import annotations

import logging
from typing import Final
from urllib.parse import urlsplit

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kithmail.web.auth import Forbidden, optional_principal, same_secret

log = logging.getLogger("kithmail.web")

__all__ = [
    "CSP",
    "CSP_SANDBOXED_HTML",
    "CSP_WITH_FRAME",
    "SecurityHeaders",
    "csrf",
    "is_https",
    "login_csrf_ok",
    "same_origin",
]

CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
CSP_WITH_FRAME: Final = CSP + "; frame-src 'self'"
# The document inside the message's frame: a sandbox of its own (no script,
# no forms, a unique origin) even if opened directly, nothing fetched but
# inline styles and data: images, framed only by our own pages.
CSP_SANDBOXED_HTML: Final = (
    "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "form-action 'none'; frame-ancestors 'self'; base-uri 'none'"
)

_ALWAYS: Final = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)


class SecurityHeaders:
    """ASGI middleware: the security headers on every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (n, v)
                    for n, v in message.get("headers", [])
                    if n not in (b"x-content-type-options", b"referrer-policy")
                ]
                names = {n for n, _ in headers}
                headers += _ALWAYS
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", CSP.encode()))
                if b"x-frame-options" not in names:
                    headers.append((b"x-frame-options", b"DENY"))
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-cache" if static else b"no-store"))
                message["headers"] = headers
            await send(message)

        limit = _body_limit(scope)
        length = _content_length(scope)
        if length is not None and length > limit:
            await self._too_large(scope, send_with_headers, send, limit)
            return
        seen = 0

        async def receive_bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLargeError()
            return message

        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send_with_headers(message)

        try:
            await self.app(scope, receive_bounded, send_tracked)
        except _TooLargeError:
            if started:
                raise
            await self._too_large(scope, send_with_headers, send, limit)
        except Exception:
            # Logged here, answered plainly: no traceback reaches a client,
            # and the 500 still carries every header above.
            log.exception("web: %s %s failed", scope.get("method"), scope.get("path"))
            if started:
                raise
            api = str(scope.get("path", "")).startswith("/api/")
            body = (
                b'{"error":"internal","detail":"an internal error; it has been logged"}'
                if api
                else b"An internal error; it has been logged."
            )
            ctype = b"application/json" if api else b"text/plain; charset=utf-8"
            await send_with_headers(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", ctype), (b"content-length", b"%d" % len(body))],
                }
            )
            await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _too_large(scope: Scope, send_start: Send, send: Send, limit: int) -> None:
        api = str(scope.get("path", "")).startswith("/api/")
        text = f"the request is larger than {limit} bytes"
        body = (
            f'{{"error":"too_large","detail":"{text}"}}'.encode()
            if api
            else f"Too large: {text}.".encode()
        )
        ctype = b"application/json" if api else b"text/plain; charset=utf-8"
        await send_start(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", ctype),
                    (b"content-length", b"%d" % len(body)),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLargeError(Exception):
    pass


# Forms and JSON bodies are small; a CSV import may be up to [web] max_upload.
BODY_SLACK: Final = 64 * 1024


def _body_limit(scope: Scope) -> int:
    app = scope.get("app")
    services = getattr(getattr(app, "state", None), "services", None)
    upload = 1024**2
    if services is not None:
        upload = int(services.settings().web.max_upload)
    return upload + BODY_SLACK


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _origin_of(url: str) -> str:
    u = urlsplit(url)
    try:
        port = u.port
    except ValueError:
        return "?"
    default = {"http": 80, "https": 443}.get(u.scheme)
    shown = f":{port}" if port is not None and port != default else ""
    return f"{u.scheme}://{(u.hostname or '').lower()}{shown}"


def is_https(request: Request) -> bool:
    """Does the browser speak HTTPS to us: our own TLS, or ``[web] https_proxy`` in front."""
    if request.url.scheme == "https":
        return True
    services = getattr(request.app.state, "services", None)
    return bool(services is not None and services.settings().web.https_proxy)


def own_origin(request: Request) -> str:
    """This listener's origin as the browser addressed it (scheme, Host header)."""
    host = request.headers.get("host", "")
    return _origin_of(f"{'https' if is_https(request) else 'http'}://{host}")


def same_origin(request: Request) -> bool:
    """False when the request says it comes from another site; True when it says nothing."""
    if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
        return False
    origin = request.headers.get("origin")
    if origin is not None:
        return origin != "null" and _origin_of(origin) == own_origin(request)
    referer = request.headers.get("referer")
    if referer:
        return _origin_of(referer) == own_origin(request)
    return True


async def _form_token(request: Request) -> str:
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype not in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return ""
    form = await request.form()
    value = form.get("csrf")
    return value if isinstance(value, str) else ""


async def csrf(request: Request) -> None:
    """Dependency of every state-changing route: `Forbidden` (403) for a forged request.

    Session requests need the session's token and a same-origin request;
    bearer-token requests are exempt. An anonymous request passes here and
    is turned away by the route's `principal` dependency.
    """
    p = await optional_principal(request)
    if p is None or p.via == "token":
        return
    if not same_origin(request):
        raise Forbidden("cross-origin request refused")
    token = request.headers.get("x-csrf-token") or await _form_token(request)
    if not same_secret(token, p.csrf):
        raise Forbidden("missing or wrong CSRF token: reload the page and try again")


async def login_csrf_ok(request: Request, cookie_token: str, form_token: str) -> bool:
    """The login form's guard: same origin, and its token matches the pre-login cookie."""
    return same_origin(request) and same_secret(cookie_token, form_token)
