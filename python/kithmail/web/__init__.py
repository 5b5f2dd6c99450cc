"""The internal web listener: the browser UI, the JSON API under /api/v1, health and /metrics.

Served by uvicorn inside gateway worker 0's event loop on `[server]
listeners.web` (127.0.0.1:8025 by default), over HTTPS when ``[web] tls``.
`make_app(services)` builds the FastAPI application; `serve_web` runs it
until cancelled.

The pieces: `kithmail.web.auth` (sessions, API tokens, who may see whom),
`kithmail.web.security` (headers on every answer, CSRF), `templating`
(server-rendered pages), `user` (the user's pages), `api` (the JSON API
under /api/v1, described by /api/v1/openapi.json), the admin half, and
`health` (/healthz, /readyz, /metrics).

Errors: under /api an error is JSON ``{"error": code, "detail": text}``
with its 4xx status (401 with ``WWW-Authenticate: Bearer`` when not logged
in); a page's error is a page, and a page that needs a login redirects to
/login. Nothing reaches the client as a 500 traceback: an unexpected
exception is logged and answered with a plain 500 that still carries every
security header.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from kithmail import asgi, config
from kithmail.web.api import router as api_router
from kithmail.web.auth import LoginLimiter
from kithmail.web.errors import install_error_handlers
from kithmail.web.health import router as health_router
from kithmail.web.security import SecurityHeaders
from kithmail.web.services import Services
from kithmail.web.templating import STATIC_DIR
from kithmail.web.user import router as user_router

__all__ = ["Services", "make_app", "serve_web", "web_tls_files"]


def make_app(services: Services) -> FastAPI:
    """The whole internal web application over the worker's open `services`."""
    app = FastAPI(
        title="kithmail",
        version="1",
        openapi_url="/api/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.services = services
    app.state.login_limiter = LoginLimiter(services.clock)
    install_error_handlers(app)
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(health_router)
    app.include_router(user_router)
    app.include_router(api_router)
    # --- the admin half: its routers are included here ---
    from kithmail.web import admin, api_admin

    app.include_router(admin.router)
    app.include_router(api_admin.router)
    # ---
    return app


def web_tls_files(settings: config.Settings) -> tuple[str, str] | None:
    """The certificate and key files the web listener serves HTTPS with; None for plain HTTP.

    With ``[web] tls``: ``[server] tls_cert``/``tls_key`` when set, else the
    gateway's self-signed pair (`kithmail.tls.ensure_certificate`).
    """
    if not settings.web.tls:
        return None
    from kithmail import tls

    server = settings.server
    if server.tls_cert is not None and server.tls_key is not None:
        return str(server.tls_cert), str(server.tls_key)
    cert, key = tls.ensure_certificate(server.data_dir, server.hostname)
    return str(cert), str(key)


async def serve_web(
    app: FastAPI,
    listeners: Sequence[str],
    *,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    sockets: Sequence[socket.socket] | None = None,
) -> None:
    """Serve ``app`` on ``listeners`` until cancelled (TLS when a certificate is given)."""
    await asgi.serve(
        app, listeners, sockets=sockets, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile
    )
