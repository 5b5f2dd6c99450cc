"""Running the services: build them from settings, serve, stop cleanly.

Trusts its settings (validated by `config`). On SIGTERM or SIGINT the
listeners close, connections in flight finish their request, and the core's
group-commit buffer is flushed before the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from kithmail import config
from kithmail.dns import Resolver
from kithmail.layers.reputation import Reputation
from kithmail.runtime import open_core, setup_logging
from kithmail.smtp.policy import PolicyService
from kithmail.spf import SpfChecker

log = logging.getLogger("kithmail.serve")


def serve_policy(settings: config.Settings) -> int:
    """Run the policy service on `[server] listeners.policy`; 0 after a clean stop."""
    setup_logging()
    core = open_core(settings)
    try:
        resolver = Resolver.from_settings(settings.dns)
        service = PolicyService(
            settings,
            core,
            Reputation.from_settings(core, settings, resolver),
            SpfChecker(settings.dns.nameservers, settings.dns.timeout),
        )
        asyncio.run(_run(service, settings.server.listeners.policy))
    finally:
        core.flush()
        core.close()
    return 0


async def _run(service: PolicyService, listeners: list[str]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = await service.start(listeners)
    for spec in listeners:
        log.info("policy service listening on %s", spec)
    await stop.wait()
    log.info("policy service stopping")
    for s in servers:
        s.close()
    for s in servers:
        await s.wait_closed()
