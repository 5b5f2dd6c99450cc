"""One lookup, keyed by the recipient's domain, for the policy every layer reads.

DESIGN.md's Tenants: a tenant is a set of local domains with its own
overrides of layer policy. Every layer asks `Policies.for_domain(domain)`
and reads its section of the `Settings` it gets back: the file's settings
with the database's global and tenant overrides over them, in DESIGN.md's
order — built-in, file, global override, tenant override
(`kithmail.overrides`) — without the layers knowing.

Trusts: the domain is already folded (lower case, IDN A-labels) by the
SMTP address parser.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from kithmail import config

if TYPE_CHECKING:
    from kithmail.overrides import Overrides

__all__ = ["DEFAULT_TENANT", "Policies", "TenantPolicy"]

DEFAULT_TENANT = "default"
# Tenants whose policy is kept at once; past it the cache starts again
# (each entry is small: tenants without overrides share one settings object).
MAX_CACHED: Final = 100_000

log = logging.getLogger("kithmail.tenants")


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """The tenant a local domain belongs to and the settings in force for it."""

    tenant: str
    settings: config.Settings


class Policies:
    """Recipient domain → (tenant, settings in force); None for a non-local domain.

    `tenant_of` maps a local domain to its tenant (the database's domain
    table; None → the default tenant). `overrides`, when given, adds the
    database's global and tenant overrides over the file's settings. The
    hot path is dict lookups: a tenant's policy is cached per overrides
    generation, which `Overrides.generation` looks at at most once a
    second, so a change made anywhere (the web UI in worker 0, `kith` from
    the shell) reaches every worker within about a second.

    A SIGHUP hands the file's new settings to `update`; everything holding
    this object (the listener, the quarantine, the web app) sees them at
    once, and a transaction under way keeps the `TenantPolicy` it began
    with.
    """

    def __init__(
        self,
        settings: config.Settings,
        tenant_of: Callable[[str], str | None] | None = None,
        overrides: Overrides | None = None,
    ) -> None:
        self._settings = settings
        self._local = frozenset(d.lower() for d in settings.domains.local)
        self._tenant_of = tenant_of
        self.overrides = overrides
        # tenant -> (overrides generation, the file's settings, policy)
        self._cache: dict[str, tuple[int, config.Settings, TenantPolicy]] = {}

    @property
    def settings(self) -> config.Settings:
        """The file's settings now in force (without any override)."""
        return self._settings

    def update(self, settings: config.Settings) -> None:
        """Swap in the file's new settings (SIGHUP)."""
        self._local = frozenset(d.lower() for d in settings.domains.local)
        self._settings = settings
        self._cache = {}

    @property
    def local_domains(self) -> frozenset[str]:
        return self._local

    def is_local(self, domain: str) -> bool:
        return domain in self._local

    def for_domain(self, domain: str) -> TenantPolicy | None:
        if domain not in self._local:
            return None
        tenant = (self._tenant_of(domain) if self._tenant_of else None) or DEFAULT_TENANT
        return self.for_tenant(tenant)

    def for_tenant(self, tenant: str) -> TenantPolicy:
        """The policy in force for a tenant by name (its settings with every override)."""
        settings = self._settings
        try:
            generation = self.overrides.generation() if self.overrides is not None else 0
        except Exception:
            log.exception("overrides unreadable; the file's settings apply")
            return TenantPolicy(tenant, settings)
        hit = self._cache.get(tenant)
        if hit is not None and hit[0] == generation and hit[1] is settings:
            return hit[2]
        if self.overrides is None:
            policy = TenantPolicy(tenant, settings)
        else:
            try:
                policy = TenantPolicy(tenant, self.overrides.effective(tenant))
            except Exception:
                # The database could not be read: the file's settings serve
                # rather than no answer at all; asked again next time.
                log.exception(
                    "overrides of tenant %s unreadable; the file's settings apply", tenant
                )
                return TenantPolicy(tenant, settings)
        if len(self._cache) >= MAX_CACHED:
            self._cache = {}
        self._cache[tenant] = (generation, settings, policy)
        return policy
