"""/healthz, /readyz and /metrics on the internal web listener.

`/healthz` says the process is up and its event loop answers; `/readyz`
says it can take mail: the spool is writable, the core and the database
answer. A downstream outage is not unreadiness (the gateway keeps
accepting and queueing; it shows in the queue metrics and alerts), so it
is never checked here. Both answer in plain text, 200 or 503, for a load
balancer; neither needs a login, and neither reveals more than a reason
code.

`/metrics` is this worker's registry (or, with several workers, every
worker's multiprocess files merged, with each worker's process metrics
read from /proc), followed by what is read at scrape time: the core's
table sizes and map use, the quarantine's size by layer, the spool
filesystem's free space (`kithmail.metrics.StateCollector`).
"""

from __future__ import annotations

import asyncio
import os
import tempfile

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from kithmail.metrics import StateCollector, declare, render
from kithmail.web.services import Services

__all__ = ["router"]

router = APIRouter(include_in_schema=False)


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _spool_writable(s: Services) -> str | None:
    try:
        fd, path = tempfile.mkstemp(prefix=".readyz-", dir=s.spool.root)
    except OSError as e:
        return f"spool not writable: {e.strerror}"
    os.close(fd)
    os.unlink(path)
    # Writable but full: every message would get 452 4.3.1 here, so a load
    # balancer should send the mail to a host that has room.
    try:
        st = os.statvfs(s.spool.root)
    except OSError as e:
        return f"spool not readable: {e.strerror}"
    free = st.f_bavail * st.f_frsize
    if free < max(s.spool.reserve_bytes, 1) or (st.f_files > 0 and st.f_favail == 0):
        return f"spool full: {free} bytes free, {s.spool.reserve_bytes} kept in reserve"
    return None


def _database(s: Services) -> str | None:
    try:
        s.database.read("SELECT 1")
    except Exception as e:  # any failure to answer is unreadiness
        return f"database: {type(e).__name__}"
    return None


def _core(s: Services) -> str | None:
    try:
        s.core.stats()
    except Exception as e:
        return f"core: {type(e).__name__}"
    return None


@router.get("/healthz")
async def healthz() -> PlainTextResponse:
    return PlainTextResponse("ok\n")


@router.get("/readyz")
async def readyz(request: Request) -> PlainTextResponse:
    s = _services(request)
    problems = [p for p in (_spool_writable(s), _database(s), _core(s)) if p]
    problems += [p for check in s.ready_checks.values() if (p := check())]
    if problems:
        return PlainTextResponse("not ready\n" + "\n".join(problems) + "\n", status_code=503)
    return PlainTextResponse("ready\n")


def _quarantine_by_layer(s: Services) -> list[tuple[str, int, int]]:
    rows = s.database.read(
        "SELECT layer, count(*), coalesce(sum(size), 0) FROM quarantine GROUP BY layer"
    )
    return [(str(layer), int(n), int(b)) for layer, n, b in rows]  # type: ignore[call-overload]


def _collectors(request: Request) -> list[Collector]:
    """The scrape-time collectors of this app, made once."""
    made: list[Collector] | None = getattr(request.app.state, "metric_collectors", None)
    if made is None:
        s = _services(request)
        declare()
        made = [
            StateCollector(
                core_stats=s.core.stats,
                quarantine=lambda: _quarantine_by_layer(s),
                spool_dir=s.spool.root,
            )
        ]
        request.app.state.metric_collectors = made
    return made


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    s = _services(request)
    extra = _collectors(request)
    # The database and /proc are read in a thread: the event loop serves SMTP.
    body = await asyncio.to_thread(
        render,
        multiprocess=s.multiprocess_metrics,
        extra=extra,
        supervisor=os.getppid() if s.multiprocess_metrics else None,
    )
    return Response(body, media_type=CONTENT_TYPE_LATEST)
