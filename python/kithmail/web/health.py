"""/healthz, /readyz and /metrics on the internal web listener.

`/healthz` says the process is up and its event loop answers; `/readyz`
says it can take mail: the spool is writable, the core and the database
answer. A downstream outage is not unreadiness (the gateway keeps
accepting and queueing; it shows in the queue metrics and alerts), so it
is never checked here. Both answer in plain text, 200 or 503, for a load
balancer; neither needs a login, and neither reveals more than a reason
code.
"""

from __future__ import annotations

import os
import tempfile

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client import multiprocess as prom_mp

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


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    s = _services(request)
    if s.multiprocess_metrics:
        registry = CollectorRegistry()
        prom_mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
