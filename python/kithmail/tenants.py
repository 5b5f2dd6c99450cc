"""One lookup, keyed by the recipient's domain, for the policy every layer reads.

DESIGN.md's Tenants: a tenant is a set of local domains with its own
overrides of layer policy. Every layer asks `Policies.for_domain(domain)`
and reads its section of the `Settings` it gets back; today that is the
config's own settings for every local domain (the database's global and
tenant overrides plug in here, in DESIGN.md's order — built-in, file,
global override, tenant override — without touching the layers).

Trusts: the domain is already folded (lower case, IDN A-labels) by the
SMTP address parser.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kithmail import config

__all__ = ["DEFAULT_TENANT", "Policies", "TenantPolicy"]

DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """The tenant a local domain belongs to and the settings in force for it."""

    tenant: str
    settings: config.Settings


class Policies:
    """Recipient domain → (tenant, settings in force); None for a non-local domain.

    `tenant_of` maps a local domain to its tenant (the database's domain
    table; None → the default tenant). Results are cached per settings: a
    SIGHUP builds a new `Policies` with the new settings.
    """

    def __init__(
        self,
        settings: config.Settings,
        tenant_of: Callable[[str], str | None] | None = None,
    ) -> None:
        self.settings = settings
        self._local = frozenset(d.lower() for d in settings.domains.local)
        self._tenant_of = tenant_of

    @property
    def local_domains(self) -> frozenset[str]:
        return self._local

    def is_local(self, domain: str) -> bool:
        return domain in self._local

    def for_domain(self, domain: str) -> TenantPolicy | None:
        if domain not in self._local:
            return None
        tenant = (self._tenant_of(domain) if self._tenant_of else None) or DEFAULT_TENANT
        return TenantPolicy(tenant, self.settings)
