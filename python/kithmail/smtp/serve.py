"""Running the services: build them from settings, serve, stop cleanly.

Trusts its settings (validated by `config`). On SIGTERM or SIGINT the
listeners close, connections in flight finish their request, and the core's
group-commit buffer is flushed before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from kithmail import config
from kithmail.dns import Resolver
from kithmail.layers.reputation import Reputation
from kithmail.metrics import Metrics, multiprocess_dir, serve_metrics
from kithmail.runtime import open_core, setup_logging
from kithmail.smtp.policy import PolicyService
from kithmail.spf import SpfChecker

log = logging.getLogger("kithmail.serve")


def serve_policy(settings: config.Settings) -> int:
    """Run the policy service on `[server] listeners.policy`; 0 after a clean stop.

    /metrics is served on the first `[server] listeners.web` address.

    With `[server] workers` > 1 the process forks that many workers, each
    opening the core after the fork (LMDB must not cross a fork) and binding
    every listener with SO_REUSEPORT; the parent forwards SIGTERM/SIGINT and
    waits for them.
    """
    setup_logging()
    n = settings.server.workers
    web = settings.server.listeners.web[0]
    if n <= 1:
        serve_metrics(web, multiprocess=False)
        log.info("metrics on http://%s/metrics", web)
        return _worker(settings, reuse_port=False)
    multiprocess_dir(settings.server.data_dir)
    serve_metrics(web, multiprocess=True)
    log.info("metrics on http://%s/metrics (merged from %d workers)", web, n)
    children: list[int] = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _worker(settings, reuse_port=True)
            finally:
                os._exit(code)
        children.append(pid)

    def forward(sig: int, _frame: object) -> None:
        for c in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    for c in children:
        _, status = os.waitpid(c, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status) & 0xFF)
    return worst


def _worker(settings: config.Settings, *, reuse_port: bool) -> int:
    core = open_core(settings)
    try:
        resolver = Resolver.from_settings(settings.dns)
        service = PolicyService(
            settings,
            core,
            Reputation.from_settings(core, settings, resolver),
            SpfChecker(settings.dns.nameservers, settings.dns.timeout),
            metrics=Metrics("policy"),
        )
        asyncio.run(_run(service, settings.server.listeners.policy, reuse_port))
    finally:
        core.flush()
        core.close()
    return 0


async def _run(service: PolicyService, listeners: list[str], reuse_port: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = await service.start(listeners, reuse_port=reuse_port)
    for spec in listeners:
        log.info("policy service listening on %s (pid %d)", spec, os.getpid())
    await stop.wait()
    log.info("policy service stopping (pid %d)", os.getpid())
    for s in servers:
        s.close()
    for s in servers:
        await s.wait_closed()
