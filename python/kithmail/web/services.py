"""What the web UI, its JSON API and the health endpoints are given to work with.

One `Services` is built by the gateway's worker 0 (`kithmail.smtp.serve`)
after the fork and handed to `kithmail.web.make_app`. Everything here is
already open; the app never opens the core, the database or the spool
itself. `settings()` and `policies()` are callables because SIGHUP swaps
in new settings (DESIGN.md, Reload) and database overrides apply at once:
read them per request, never keep what they return.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kithmail import config
    from kithmail.db import Database
    from kithmail.quarantine import Quarantine
    from kithmail.spool import Spool
    from kithmail.tenants import Policies

__all__ = ["Services"]


@dataclass
class Services:
    """The open parts of one gateway worker that the web app uses."""

    settings: Callable[[], config.Settings]
    policies: Callable[[], Policies]
    database: Database
    quarantine: Quarantine
    spool: Spool
    # kithmail._core.Core: the community table (`core.community`), Recon and
    # Reputation, for the pages that show or change them.
    core: Any
    clock: Callable[[], float]
    data_dir: Path
    # True when /metrics must merge the workers' multiprocess files.
    multiprocess_metrics: bool = False
    # Extra readiness checks: name -> callable returning None when fine or
    # a short reason when not (the spool, core and database are built in).
    ready_checks: dict[str, Callable[[], str | None]] = field(default_factory=dict)
    # Called after a change that running parts must see at once (an
    # override, a tenant's domain); may be None.
    on_policy_change: Callable[[], Awaitable[None]] | None = None
    # kithmail.overrides.Overrides: the database's global and tenant policy
    # overrides (get/set/unset/explain); None when not wired.
    overrides: Any = None
