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

import re
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
        """The value of our Authentication-Results field (no name, no CRLF, may fold).

        One resinfo per line (RFC 8601 §2.2): `spf` for MAIL FROM and HELO,
        one `dkim` per signature checked, then `dmarc` and `arc`. Every
        value is a token or a quoted-string (`_value`), so no quote, CR, LF,
        semicolon or parenthesis from a message can end a field, a resinfo
        or a string early; comments hold only our own words.
        """
        items: list[str] = []
        for spf in (self.spf_mailfrom, self.spf_helo):
            if spf is not None:
                prop = "smtp.mailfrom" if spf.identity == "mailfrom" else "smtp.helo"
                props = [f"{prop}={_domain(spf.domain)}"] if spf.domain else []
                items.append(_resinfo("spf", spf.result, spf.detail, props))
        for d in self.dkim:
            props = []
            if d.domain:
                props.append(f"header.d={_domain(d.domain)}")
            if d.selector:
                props.append(f"header.s={_value(d.selector)}")
            items.append(_resinfo("dkim", d.result, d.reason, props))
        if self.dmarc is not None:
            m = self.dmarc
            props = [f"header.from={_domain(m.from_domain)}"] if m.from_domain else []
            comment = f"p={m.policy}" if m.policy in _POLICIES else ""
            items.append(_resinfo("dmarc", m.result, m.reason, props, comment))
        if self.arc is not None:
            a = self.arc
            props = [f"header.d={_domain(a.sealer)}"] if a.sealer else []
            comment = f"{a.sets} set{'' if a.sets == 1 else 's'}" if a.sets else ""
            items.append(_resinfo("arc", a.result, a.reason, props, comment))
        head = _value(authserv_id) or "unknown"
        if not items:
            return f"{head}; none"
        return head + ";" + ";".join(f"{_FOLD}{i}" for i in items)

    def summary(self) -> str:
        """One line for logs and the quarantine: "spf=pass dkim=pass dmarc=pass".

        Each method with what it was about: `dkim=pass:example.com,fail:evil.test`,
        `dmarc=fail:example.com:p=reject`, `arc=pass:lists.example.org`;
        message-derived text is cut to printable ASCII.
        """
        spf = self.spf_mailfrom or self.spf_helo
        parts = [f"spf={spf.result}" if spf is not None else "spf=none"]
        if self.dkim:
            parts.append(
                "dkim="
                + ",".join(f"{d.result}:{d.domain}" if d.domain else d.result for d in self.dkim)
            )
        else:
            parts.append("dkim=none")
        if self.dmarc is not None:
            m = self.dmarc
            tail = "".join(f":{x}" for x in (m.from_domain, m.policy and f"p={m.policy}") if x)
            parts.append(f"dmarc={m.result}{tail}")
        if self.arc is not None and self.arc.result != "none":
            parts.append(
                f"arc={self.arc.result}" + (f":{self.arc.sealer}" if self.arc.sealer else "")
            )
        return _printable(" ".join(parts))[:1000]


# ---------------------------------------------------------------- RFC 8601 text

# RFC 2045 §5.1 tspecials: a token holds none of these, nor space or CTLs.
_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')
_POLICIES = ("none", "quarantine", "reject")
_FOLD = "\r\n\t"  # each resinfo starts a line of its own
_LINE = 78  # RFC 5322 §2.1.1: lines SHOULD stay within 78 characters
_MAX_VALUE = 255  # a domain name's length; longer values are cut (and say so)
_LDH = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9])?)*"
)


def _printable(s: str) -> str:
    """Printable ASCII only: anything else (CR, LF, NUL, DEL, non-ASCII) becomes '?'."""
    return "".join(c if " " <= c <= "~" else "?" for c in s)


def _value(s: str) -> str:
    """An RFC 8601 `value`: `s` as a token when it is one, else a quoted-string.

    Cut to printable ASCII first, so neither CR/LF (a new header), a quote
    (the end of the string) nor anything an MUA might render differently
    gets through; a backslash and a quote are escaped as quoted-pairs.
    """
    s = _printable(s)
    if len(s) > _MAX_VALUE:
        s = s[: _MAX_VALUE - 3] + "..."
    if s and all(c > " " and c not in _TSPECIALS for c in s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _domain(d: str) -> str:
    """A domain as a pvalue: its A-label form when it is a domain name, else quoted."""
    try:
        a = d.rstrip(".").encode("idna").decode("ascii") if not d.isascii() else d
    except UnicodeError:
        a = d
    return a.lower() if _LDH.fullmatch(a) else _value(d)


def _resinfo(method: str, result: str, reason: str, props: list[str], comment: str = "") -> str:
    """`method=result [(comment)] [reason=value] props…`, folded before a part that overflows."""
    parts = [f"{method}={result}"]
    if comment:
        parts.append(f"({comment})")
    if reason:
        parts.append(f"reason={_value(reason)}")
    parts.extend(props)
    out = parts[0]
    width = 8 + len(out)  # a tab counts as up to eight columns
    for p in parts[1:]:
        if width + 1 + len(p) > _LINE:
            out += _FOLD + " " + p
            width = 9 + len(p)
        else:
            out += " " + p
            width += 1 + len(p)
    return out
