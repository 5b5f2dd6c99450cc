"""The public pages: what the outside world reaches on ``[server] listeners.public``.

Two kinds of page. ``/sav/<token>``, where a challenged sender confirms a
held message with one click; and ``/digest/<token>``, where a user acts on
one message listed in their quarantine digest (`kithmail.digest`): release
it, or allow its sender and release it. Both follow the same rules. ``GET`` shows the held message's sender and
subject and one button, and changes nothing (link scanners and previews
follow links with GET); only ``POST`` confirms, with the same effect as a
reply (`Sav.confirm`, then the caller's ``on_verified``). A token that is
not one, is forged or unknown gets a polite 404; an expired or spent one a
410. A digest link's GET names the action and the message; its POST does
that one action once (`Digest.check`, then `Digest.act`); a message no
longer held is a 410, one only an admin may release a 403, and a fault of
ours a 503 page (the link is then not spent), never a 500. `serve_public` runs the app with uvicorn inside the current event
loop, on sockets of its own.

Why a POST cannot be forged across sites: there is no ambient authority to
ride — no cookie, no session, no login; the capability is the token in the
path, a 128-bit MAC that only the challenged mailbox was sent. On top of
that (a browser that was tricked into posting must still be refused): the
POST must carry the form field ``form``, an HMAC of the token under the
gateway's key that only a rendered page contains (so a blind POST to a
link fails), an ``Origin`` (or, without one, a ``Referer``) that is
``[server] public_url``'s, and no ``Sec-Fetch-Site: cross-site``.

Trusts nothing of a request: the token is checked by `Sav.check` (or
`Digest.check`), the body
is read up to 4 KiB, and everything shown (sender, subject) is HTML-escaped
and cut short. Every answer carries a Content-Security-Policy that allows
no script, no external resource and no framing, ``X-Frame-Options: DENY``,
``Cache-Control: no-store`` and ``Referrer-Policy: no-referrer`` (the URL
holds the token).

Standards: RFC 9110 (HTTP semantics: safe GET, 404/410), RFC 6454
(Origin), W3C CSP Level 3, Fetch Metadata (Sec-Fetch-Site), RFC 3834
(why a page, not only a reply: autoresponders must not confirm).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import html
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kithmail import asgi, config
from kithmail.asgi import bind
from kithmail.db import Database
from kithmail.digest import Action, Digest, Link
from kithmail.sav import OnVerified, Sav, TokenData
from kithmail.sav.message import MAX_SUBJECT, clean_text

__all__ = ["SECURITY_HEADERS", "bind", "make_app", "serve_public"]

log = logging.getLogger("kithmail.public")

MAX_BODY: Final = 4096
SECURITY_HEADERS: Final = (
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)

_CSS = """
body { font-family: system-ui, sans-serif; background: #f4f4f2; color: #222; margin: 0; }
main { max-width: 34em; margin: 4em auto; background: #fff; padding: 2em 2.5em;
       border-radius: 6px; box-shadow: 0 1px 3px rgba(0,0,0,.12); line-height: 1.5; }
h1 { font-size: 1.4em; margin-top: 0; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .3em 1em; }
dt { color: #666; } dd { margin: 0; overflow-wrap: anywhere; }
button { font-size: 1.05em; padding: .6em 1.4em; background: #2a5db0; color: #fff;
         border: 0; border-radius: 4px; cursor: pointer; }
"""

_WHY = {
    "sav.token_expired": (
        410,
        "This link has expired",
        "The time to confirm this message has passed. The recipient can still "
        "release it from their quarantine.",
    ),
    "sav.token_used": (
        410,
        "Already confirmed",
        "This message was confirmed already. Thank you; nothing more is needed.",
    ),
}
_NOT_FOUND = (
    404,
    "Link not found",
    "This confirmation link is not valid. Please check that it was copied whole.",
)


_DIGEST_WHY = {
    "digest.token_expired": (
        410,
        "This link has expired",
        "The links of a digest work for a limited time. The message may still be in "
        "your quarantine: ask your administrator, or wait for the next digest.",
    ),
    "digest.token_used": (
        410,
        "This link was used already",
        "Each link of a digest works once. Nothing more was done.",
    ),
    "digest.not_held": (
        410,
        "This message is no longer held",
        "It was released or deleted already, or its time in the quarantine ran out.",
    ),
    "digest.admin_only": (
        403,
        "Only an administrator can release this message",
        "It was held because a virus or dangerous content was found in it.",
    ),
    "digest.user_disabled": (
        403,
        "This account is disabled",
        "Links of a disabled account do nothing.",
    ),
    "digest.refused": (
        409,
        "This cannot be done",
        "The quarantine refused this action for this message. Nothing was changed.",
    ),
}
_DIGEST_DONE = {
    "digest.released": ("Released", "The message is on its way to your inbox."),
    "digest.allowed": (
        "Sender allowed and released",
        "The message is on its way to your inbox, with any other message held from the "
        "same sender; their next messages will be delivered at once.",
    ),
}
_DIGEST_ASK = {
    Action.RELEASE: ("Release this message?", "Release it"),
    Action.ALLOW: ("Allow this sender and release?", "Allow the sender and release"),
}


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    e = html.escape
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><main><h1>{e(title)}</h1>\n{body}</main></body></html>\n"
    )
    return HTMLResponse(doc, status_code=status)


def _refusal(reason: str) -> HTMLResponse:
    status, title, text = _WHY.get(reason) or _DIGEST_WHY.get(reason) or _NOT_FOUND
    return _page(title, f"<p>{html.escape(text)}</p>", status)


def _when(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


Handler = Callable[[Request], Awaitable[Response]]


def _never_500(handler: Handler) -> Handler:
    """A fault of ours (a database that cannot be read, …) is a polite 503, never a 500.

    Inside the routes, so the answer still carries the security headers.
    """

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception:
            log.exception("public page: %s %s failed", request.method, request.url.path[:20])
            return _page(
                "Please try again later",
                "<p>Something went wrong on our side. Nothing was changed; please try "
                "the link again later.</p>",
                503,
            )

    return wrapped


class _SecurityHeaders:
    """ASGI middleware: the security headers on every response, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                headers = [(n, v) for n, v in message.get("headers", []) if n not in names]
                message["headers"] = [*headers, *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _origin(url: str) -> str:
    u = urlsplit(url)
    default = {"http": 80, "https": 443}.get(u.scheme)
    port = f":{u.port}" if u.port is not None and u.port != default else ""
    return f"{u.scheme}://{(u.hostname or '').lower()}{port}"


def make_app(
    settings: config.Settings,
    db: Database,
    on_verified: OnVerified | None,
    *,
    sav: Sav | None = None,
    digest: Digest | None = None,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The public pages' ASGI app.

    ``on_verified(tenant, user, sender)`` is awaited once per confirmed
    challenge (add the sender to the user's community, release their held
    mail); ``sav`` defaults to one made from ``settings`` and ``db``.
    Without ``digest`` the digest links answer 404.
    """
    s = sav if sav is not None else Sav(db, settings, clock=clock)

    def base() -> str:
        """`public_url` in force (a SIGHUP may change it: `Sav.settings` is swapped)."""
        return s.settings.server.public_url.rstrip("/")

    def describe(data: TokenData) -> str:
        subject = clean_text(s.held_subject(data), MAX_SUBJECT) or "(subject not known)"
        e = html.escape
        return (
            "<dl>"
            f"<dt>From</dt><dd>{e(data.sender)}</dd>"
            f"<dt>To</dt><dd>{e(data.user)}</dd>"
            f"<dt>Subject</dt><dd>{e(subject)}</dd>"
            "</dl>"
        )

    async def show(request: Request) -> Response:
        token = str(request.path_params["token"])
        got = await asyncio.to_thread(s.check, token)
        if isinstance(got, str):
            log.info("public page: GET of a refused token: %s", got)
            return _refusal(got)
        tag = s.page_tag(token)
        body = (
            "<p>A message from you is held until you confirm that you sent it:</p>"
            f"{describe(got)}"
            f'<form method="post" action="{html.escape(base())}/sav/{html.escape(token)}">'
            f'<input type="hidden" name="form" value="{tag}">'
            '<button type="submit">Yes, I sent this message</button></form>'
            "<p>If you did not send it, just close this page: nothing happens.</p>"
        )
        return _page("Please confirm your message", body)

    def cross_site(request: Request) -> bool:
        allowed = _origin(base())
        if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
            return True
        origin = request.headers.get("origin")
        if origin is not None:
            return origin.strip().lower() in ("null", "") or _origin(origin.strip()) != allowed
        referer = request.headers.get("referer")
        if referer is not None:
            return _origin(referer) != allowed
        return False  # neither: not a browser's cross-site form; the token and tag still rule

    async def form_of(request: Request) -> dict[str, list[str]] | Response:
        """The POSTed form, or the refusal: cross-site, not a form, too large."""
        if cross_site(request):
            log.warning(
                "public page: cross-site POST refused (origin %r)", request.headers.get("origin")
            )
            return _page("Not allowed", "<p>This form must be sent from its own page.</p>", 403)
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            return _page("Bad request", "<p>Please use the button on the page.</p>", 400)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return _page("Bad request", "<p>That request is too large.</p>", 413)
        try:
            return parse_qs(body.decode("ascii", "replace"), max_num_fields=8)
        except ValueError:  # more fields than that
            return _page("Bad request", "<p>Please use the button on the page.</p>", 400)

    def tag_ok(fields: dict[str, list[str]], expected: str) -> bool:
        sent_tag = (fields.get("form") or [""])[0]
        return hmac.compare_digest(sent_tag.encode(), expected.encode())

    async def confirm(request: Request) -> Response:
        token = str(request.path_params["token"])
        fields = await form_of(request)
        if isinstance(fields, Response):
            return fields
        got = await asyncio.to_thread(s.check, token)
        if isinstance(got, str):
            log.warning("public page: POST of a refused token: %s", got)
            return _refusal(got)
        if not tag_ok(fields, s.page_tag(token)):
            log.warning("public page: POST without the page's form tag refused")
            return _page("Bad request", "<p>Please use the button on the page.</p>", 400)
        if not await s.confirm(got, on_verified, via="page"):
            return _refusal("sav.token_used")
        body_html = (
            "<p>Thank you. Your message to "
            f"<strong>{html.escape(got.user)}</strong> is released, and your next "
            "messages to them will be delivered at once.</p>"
        )
        return _page("Confirmed", body_html)

    def describe_held(link: Link) -> tuple[str, bool] | None:
        """The message a digest link names, as a list for the page, and whether only
        an admin may release it; None when it is not held (for that user) any more."""
        assert digest is not None
        held = digest.held(link)
        if held is None:
            return None
        e = html.escape
        subject = clean_text(held.subject, MAX_SUBJECT) or "(no subject)"
        sender = clean_text(held.from_addr or held.sender, 254) or "(no sender)"
        shown = (
            "<dl>"
            f"<dt>From</dt><dd>{e(sender)}</dd>"
            f"<dt>To</dt><dd>{e(link.user)}</dd>"
            f"<dt>Subject</dt><dd>{e(subject)}</dd>"
            f"<dt>Held</dt><dd>{e(_when(held.held_at))}</dd>"
            f"<dt>Why</dt><dd>{e(clean_text(held.reason, 80))}</dd>"
            "</dl>"
        )
        return shown, held.admin_only or held.layer == "antivirus"

    async def digest_checked(token: str) -> tuple[Link, str] | Response:
        """The link and its page's description, or the refusal page."""
        if digest is None:
            return _refusal("")
        got = await asyncio.to_thread(digest.check, token)
        if isinstance(got, str):
            log.info("public page: digest link refused: %s", got)
            return _refusal(got)
        described = await asyncio.to_thread(describe_held, got)
        if described is None:
            return _refusal("digest.not_held")
        shown, admin_only = described
        if admin_only:
            return _refusal("digest.admin_only")
        return got, shown

    async def digest_show(request: Request) -> Response:
        token = str(request.path_params["token"])
        checked = await digest_checked(token)
        if isinstance(checked, Response):
            return checked
        link, described = checked
        assert digest is not None
        title, button = _DIGEST_ASK[link.action]
        e = html.escape
        extra = (
            "<p>The sender is added to your contacts, and every message held from them "
            "is released too.</p>"
            if link.action is Action.ALLOW
            else ""
        )
        body = (
            f"<p>This message is held in your quarantine:</p>{described}{extra}"
            f'<form method="post" action="{e(base())}/digest/{e(token)}">'
            f'<input type="hidden" name="form" value="{digest.page_tag(token)}">'
            f'<button type="submit">{e(button)}</button></form>'
            "<p>If you do not want this, just close this page: nothing happens.</p>"
        )
        return _page(title, body)

    async def digest_act(request: Request) -> Response:
        token = str(request.path_params["token"])
        fields = await form_of(request)
        if isinstance(fields, Response):
            return fields
        checked = await digest_checked(token)
        if isinstance(checked, Response):
            return checked
        link, _ = checked
        assert digest is not None
        if not tag_ok(fields, digest.page_tag(token)):
            log.warning("public page: digest POST without the page's form tag refused")
            return _page("Bad request", "<p>Please use the button on the page.</p>", 400)
        result = await digest.act(link)  # an error un-spends the link: a 503 (_never_500)
        if result in _DIGEST_DONE:
            title, text = _DIGEST_DONE[result]
            return _page(title, f"<p>{html.escape(text)}</p>")
        return _refusal(result)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        if status == 405:
            return _page("Not allowed", "<p>That method is not allowed here.</p>", 405)
        return _refusal("")

    app = Starlette(
        routes=[
            Route("/sav/{token}", _never_500(show), methods=["GET", "HEAD"]),
            Route("/sav/{token}", _never_500(confirm), methods=["POST"]),
            Route("/digest/{token}", _never_500(digest_show), methods=["GET", "HEAD"]),
            Route("/digest/{token}", _never_500(digest_act), methods=["POST"]),
        ],
        exception_handlers={404: not_found, 405: not_found},
    )
    app.add_middleware(_SecurityHeaders)
    return app


async def serve_public(
    app: ASGIApp, listeners: Sequence[str], *, sockets: Sequence[socket.socket] | None = None
) -> None:
    """Serve ``app`` on ``listeners`` (``[server] listeners.public``) until cancelled."""
    await asgi.serve(app, listeners, sockets=sockets)
