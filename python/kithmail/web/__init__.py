"""The internal web listener: the browser UI, the JSON API under /api/v1, health and /metrics.

Served by uvicorn inside gateway worker 0's event loop on `[server]
listeners.web` (127.0.0.1:8025 by default). `make_app(services)` builds the
FastAPI application; `serve_web` runs it until cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator, Sequence

import uvicorn
from fastapi import FastAPI

from kithmail.web.health import router as health_router
from kithmail.web.services import Services

__all__ = ["Services", "make_app", "serve_web"]


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
    app.include_router(health_router)
    return app


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The gateway owns SIGTERM/SIGINT/SIGHUP; uvicorn would replace its handlers.
        yield


async def serve_web(
    app: FastAPI,
    listeners: Sequence[str],
    *,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    sockets: Sequence[socket.socket] | None = None,
) -> None:
    """Serve ``app`` on ``listeners`` until cancelled (TLS when a certificate is given)."""
    from kithmail.public import bind

    socks = list(sockets) if sockets is not None else bind(listeners)
    cfg = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        http="h11",
        ws="none",
        timeout_keep_alive=5,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )
    server = _Server(cfg)
    task = asyncio.ensure_future(server.serve(sockets=socks))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise
    finally:
        for sock in socks:
            sock.close()
