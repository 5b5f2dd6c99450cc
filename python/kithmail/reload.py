"""SIGHUP: the config file read again and its new, immutable settings swapped in.

DESIGN.md, Reload: each worker of `kith serve` re-reads its file on SIGHUP
(the parent forwards the signal to every worker); a valid file's settings
replace the old ones in every part that holds them (`apply`, given by the
server), a file that does not validate keeps the old settings and the log
says why, in one line naming the file. What cannot change under a running
process — the listeners, `data_dir`, the number of workers, the core's
shape, the resolver's nameservers — keeps its old value, and the log says
that it needs a restart. A SIGHUP never stops the server: with no file
(`kith serve` on the embedded default) there is nothing to re-read, and
the log says so.

Trusts the file no more than at start: it goes through `config.load`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Final

from pydantic import BaseModel

from kithmail import config

__all__ = ["EMBEDDED", "RESTART_KEYS", "keep_restart_keys", "reload_once", "watch"]

log = logging.getLogger("kithmail.reload")

EMBEDDED: Final = config.Settings().source

# Dotted keys a running process cannot take on: they keep their old value
# until a restart. (Listeners are bound, data_dir and the core's shape are
# open, the worker count is forked, the resolver and call-ahead are shared
# by the queue and the listener; the policy service's clients are parsed
# once.)
RESTART_KEYS: Final = (
    "server.listeners",
    "server.data_dir",
    "server.workers",
    "server.core_map_size",
    "recon.ipv4_prefix",
    "recon.ipv6_prefix",
    "recon.commit_window",
    "recon.ipv6_new_per_48",
    "dns.nameservers",
    "dns.timeout",
    "domains.verify_recipients",
    "domains.callahead_ttl",
    "domains.callahead_negative_ttl",
    "domains.callahead_timeout",
    "policy.policy_clients",
)


def keep_restart_keys(
    old: config.Settings, new: config.Settings
) -> tuple[config.Settings, list[str]]:
    """`new` with every restart-only key that changed set back to `old`'s; and those keys."""
    changed: dict[str, dict[str, Any]] = {}
    ignored: list[str] = []
    for key in RESTART_KEYS:
        section, _, name = key.partition(".")
        was = getattr(getattr(old, section), name)
        if getattr(getattr(new, section), name) != was:
            changed.setdefault(section, {})[name] = was
            ignored.append(key)
    if not changed:
        return new, []
    update: dict[str, BaseModel] = {
        section: getattr(new, section).model_copy(update=values)
        for section, values in changed.items()
    }
    return new.model_copy(update=update), ignored


async def reload_once(
    current: Callable[[], config.Settings],
    apply: Callable[[config.Settings], Awaitable[None]],
) -> bool:
    """Read the file of the settings in force again and apply it; True when applied."""
    old = current()
    pid = os.getpid()
    if old.source == EMBEDDED:
        log.warning(
            "SIGHUP: kith serve runs on the embedded default (no -c FILE): "
            "nothing to re-read (pid %d)",
            pid,
        )
        return False
    try:
        new = await asyncio.to_thread(config.load, old.source)
    except config.ConfigError as e:
        why = "; ".join(str(e).splitlines())
        log.error("reload refused, the settings in force stay: %s (pid %d)", why, pid)
        return False
    applied, ignored = keep_restart_keys(old, new)
    for key in ignored:
        log.warning(
            "reload: %s changed in %s: it needs a restart; ignored until then (pid %d)",
            key,
            old.source,
            pid,
        )
    try:
        await apply(applied)
    except Exception as e:  # a certificate or a list that cannot be read
        log.error(
            "reload refused, the settings in force stay: %s: %s (pid %d)",
            old.source,
            "; ".join(str(e).splitlines()) or type(e).__name__,
            pid,
        )
        return False
    log.info("reload: the settings of %s are in force (pid %d)", old.source, pid)
    return True


async def watch(
    requested: asyncio.Event,
    current: Callable[[], config.Settings],
    apply: Callable[[config.Settings], Awaitable[None]],
) -> None:
    """Reload each time `requested` is set (by the SIGHUP handler), one reload at a time."""
    while True:
        await requested.wait()
        requested.clear()
        try:
            await reload_once(current, apply)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reload failed; the settings in force stay")
