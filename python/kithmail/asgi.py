"""Serving an ASGI app (the web UI, the public pages) inside the gateway's own event loop.

Both web listeners run uvicorn in a worker's asyncio loop beside the SMTP
listeners, rather than as processes of their own, so they share the
worker's open database, spool and core. `bind` makes the listening
sockets first, so a port in use fails the start with its address, and
`serve` runs the app on them until it is cancelled.

Trusts: the listener strings are already validated by `kithmail.config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Iterator, Sequence

import uvicorn
from starlette.types import ASGIApp

__all__ = ["bind", "serve"]


def bind(listeners: Sequence[str]) -> list[socket.socket]:
    """Listening TCP sockets for "IP:PORT" / "[IPv6]:PORT" strings (port 0: any free one)."""
    out: list[socket.socket] = []
    try:
        for listener in listeners:
            host, _, port = listener.strip().rpartition(":")
            host = host.strip("[]")
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, int(port)))
            sock.listen(128)
            sock.setblocking(False)
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The gateway owns SIGTERM/SIGINT/SIGHUP; uvicorn would replace its handlers.
        yield


async def serve(
    app: ASGIApp,
    listeners: Sequence[str],
    *,
    sockets: Sequence[socket.socket] | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> None:
    """Serve ``app`` on ``listeners`` until cancelled (TLS when a certificate is given).

    ``sockets`` (already listening, from `bind`) replace ``listeners`` when
    given. On cancellation the server stops accepting, finishes what is in
    flight, closes the sockets and the cancellation goes on.
    """
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
