"""What the authentication checks found, kept with the message and shown as one header.

`AuthResults` is filled in the course of a transaction: the SPF results
at the first RCPT that Recon and Reputation let through, DKIM, DMARC and
ARC at the end of DATA. The SMTP listener writes `header()` as the one
`Authentication-Results` field of every accepted message (RFC 8601); the
quarantine and logs show `summary()`; the community layer (a later issue)
asks `identity()` whether the header From is authenticated.

Trusts nothing it is given as text: every value that came from the client
or from the message (domains, selectors, addresses) is escaped as an RFC
8601 `value` (a token or a quoted-string) before it reaches the header.
Standards: RFC 8601 (Authentication-Results), RFC 7208 §9.1, RFC 6376 §3.5,
RFC 7489 §11, RFC 8617 §7.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ArcResult", "AuthResults", "DkimResult", "DmarcResult", "SpfResult"]

SpfValue = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
DkimValue = Literal["pass", "fail", "neutral", "none", "policy", "temperror", "permerror"]
DmarcValue = Literal["pass", "fail", "none", "temperror", "permerror"]
ArcValue = Literal["pass", "fail", "none"]


@dataclass(frozen=True, slots=True)
class SpfResult:
    """One SPF check: `identity` "mailfrom" (RFC 7208 §2.4) or "helo" (§2.3)."""

    identity: Literal["mailfrom", "helo"]
    domain: str  # the domain checked ("" when there was none, e.g. the null sender's HELO)
    result: SpfValue
    client_ip: str = ""
    network: int | None = None  # prefix length of the mechanism that passed
    all: bool = False  # `all` matched
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DkimResult:
    """One DKIM-Signature, verified (RFC 6376). `reason` tells a broken
    signature ("body hash did not verify") from a missing or malformed key."""

    result: DkimValue
    domain: str  # d=
    selector: str = ""  # s=
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """The DMARC evaluation of the header From's domain (RFC 7489)."""

    result: DmarcValue
    from_domain: str  # the header From's domain ("" when there is no single one)
    org_domain: str = ""  # its organisational domain (public suffix list)
    policy: Literal["none", "quarantine", "reject", ""] = ""  # p= or sp= that applied
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""  # e.g. "no single From address", "pct=50 sampled out"


@dataclass(frozen=True, slots=True)
class ArcResult:
    """The ARC chain's validation (RFC 8617) and the sealer of its last set."""

    result: ArcValue
    sealer: str = ""  # d= of the newest ARC-Seal
    sets: int = 0
    reason: str = ""


@dataclass(slots=True)
class AuthResults:
    """Everything the anti-spoofing layer found for one transaction."""

    spf_mailfrom: SpfResult | None = None
    spf_helo: SpfResult | None = None
    dkim: list[DkimResult] = field(default_factory=list)
    dmarc: DmarcResult | None = None
    arc: ArcResult | None = None
    header_from: str = ""  # the single header From address, as parsed ("" when none or several)

    def header(self, authserv_id: str) -> str:
        """The value of our Authentication-Results field (no name, no CRLF, may fold)."""
        raise NotImplementedError  # the anti-spoofing layer's issue builds it

    def summary(self) -> str:
        """One line for logs and the quarantine: "spf=pass dkim=pass dmarc=pass"."""
        raise NotImplementedError
