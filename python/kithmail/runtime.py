"""What every long-running kithmail process builds from its settings.

One place that turns validated settings into the open core, the resolver and
the layers, so `kith policy` and (later) `kith serve` build them alike.
"""

from __future__ import annotations

import logging
import sys

from kithmail import Core, config


def open_core(settings: config.Settings) -> Core:
    """The core at `<data_dir>/core`, with the settings' prefixes and timings.

    A core built with other prefix lengths raises ConfigMismatchError, which
    names both: the server never re-keys the Recon table silently.
    """
    r = settings.recon
    settings.core_dir.mkdir(parents=True, exist_ok=True)
    return Core(
        str(settings.core_dir),
        map_size=settings.server.core_map_size,
        ipv4_prefix=r.ipv4_prefix,
        ipv6_prefix=r.ipv6_prefix,
        min_delay=int(r.min_delay),
        retry_window=int(r.retry_window),
        pass_ttl=int(r.pass_ttl),
        commit_window_ms=int(r.commit_window * 1000),
        ipv6_new_per_48=r.ipv6_new_per_48,
    )


def setup_logging() -> None:
    """One line per event on stderr, as journald and log shippers take it."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s",
    )
    # aiosmtpd logs every peer and command at INFO under "mail.log"; the
    # listener writes its own line per transaction instead.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
