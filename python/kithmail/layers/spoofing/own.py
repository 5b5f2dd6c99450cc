"""Our own domains: mail from outside that claims a local domain must prove it.

The classic CEO-fraud path is a message from outside whose header From
(or envelope sender) is one of the tenant's own domains. Such a message is
spoofing unless SPF passes for the claimed domain or a DKIM signature of
it verifies — whether or not the domain publishes DMARC, since many
organisations never do, or publish `p=none` for years.

A claim is a header From domain or a MAIL FROM domain equal to a local
domain or below one (`x@branch.example.test` claims `example.test` too).
It is authenticated by an SPF pass for the MAIL FROM identity, or a DKIM
pass, whose domain is aligned with the claimed one in DMARC's relaxed
sense (the same organisational domain, RFC 7489 §3.1). Mail from
`[domains] trusted_networks` (our own servers) is not "from outside" and
is never checked here.

Trusts: the parsed From domains (`dmarc.author`) and the SPF and DKIM
results already in the transaction's `AuthResults`.
Standards: RFC 7489 §3.1 (alignment, reused), RFC 7208, RFC 6376.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from kithmail.layers.spoofing.dmarc import aligned
from kithmail.layers.spoofing.results import DkimResult, SpfResult

__all__ = ["Claim", "from_outside", "own_domain", "unauthenticated_claims"]


@dataclass(frozen=True, slots=True)
class Claim:
    """A local domain claimed by the message, and where."""

    where: str  # "header From" or "envelope sender"
    domain: str  # the domain as written (folded)
    local: str  # the local domain it is or is below


def own_domain(domain: str, local_domains: Iterable[str]) -> str | None:
    """The local domain that `domain` is, or is below; None when it is not ours."""
    d = domain.lower().rstrip(".")
    for local in local_domains:
        if d == local or d.endswith("." + local):
            return local
    return None


def from_outside(client_ip: str, trusted_networks: Sequence[str]) -> bool:
    """True unless the client is in one of `trusted_networks` (our own servers)."""
    try:
        addr = ipaddress.ip_address(client_ip)
    except ValueError:
        return True
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for net in trusted_networks:
        n = ipaddress.ip_network(net)
        if n.version == addr.version and addr in n:
            return False
    return True


def _authenticated(
    domain: str, spf: SpfResult | None, dkim: Sequence[DkimResult], psl: PublicSuffixList
) -> bool:
    if spf is not None and spf.result == "pass" and aligned(spf.domain, domain, "r", psl):
        return True
    return any(d.result == "pass" and aligned(d.domain, domain, "r", psl) for d in dkim)


def unauthenticated_claims(
    *,
    from_domains: Iterable[str],
    mail_from: str,
    local_domains: Iterable[str],
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    psl: PublicSuffixList,
) -> list[Claim]:
    """Every claim of a local domain that neither SPF nor DKIM authenticates."""
    locals_ = sorted(local_domains, key=len, reverse=True)  # the longest match names it
    claims: list[Claim] = []
    for d in dict.fromkeys(from_domains):
        local = own_domain(d, locals_)
        if local is not None:
            claims.append(Claim("header From", d, local))
    env = mail_from.rpartition("@")[2].lower().rstrip(".") if "@" in mail_from else ""
    if env:
        local = own_domain(env, locals_)
        if local is not None:
            claims.append(Claim("envelope sender", env, local))
    return [c for c in claims if not _authenticated(c.domain, spf, dkim, psl)]
