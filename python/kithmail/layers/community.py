"""Layer 5, the community: per recipient, deliver, discard or hold.

At the end of DATA, after layers 3 and 4 gave the transaction one action,
`Community.decide` answers for each recipient user: the message's
*authenticated* identity found in that user's community (or the
organisation's, under the tenant's pseudo-user `org_user`) → deliver
(`community.member`); on its block list → discard (`community.blocked`);
not found, or not authenticated at all → hold in the user's quarantine
(`community.unknown`, the detail saying which and why).

The identity is the header From address, and it counts only as DESIGN.md's
"The community checks an authenticated identity" says (`authenticated_identity`):
DMARC passes for it; or its domain publishes no DMARC record and SPF passes
for an envelope sender of the same organisational domain, or a DKIM
signature of that organisational domain verifies; or, with `[community]
require_auth = false`, nothing about it fails (SPF and DKIM `none` or
`neutral`). A fail or softfail never counts, so a forged member address is
unknown, never allowed. A `list:` entry is consulted only when the message
is DKIM-signed or SPF-passed by the List-Id's organisational domain
(`list_authenticated`); that is the list vouching for itself, so a list
entry can match mail whose author is not authenticated (a list that
rewrites or re-signs), while the author's own address and domain entries
never do.

"Earlier layers stand" (DESIGN.md): the community only chooses among
messages layers 1–4 accepted or tagged; `outcome` combines the two.

Trusts: the `AuthResults` the anti-spoofing layer filled in (this module
does no DNS and reads no signatures), and the recipient users as given
(folded, `+tag` already mapped). Nothing from the message is trusted: the
List-Id is parsed here with bounds, and message text reaches a verdict's
detail only cut to printable ASCII. The only I/O is the core's community
lookups (one `member_many` for several recipients).
Standards: RFC 7489 §3.2 (organisational domain) and §4 (DMARC), RFC 7208
(SPF), RFC 6376 (DKIM), RFC 2919 (List-Id), RFC 5322 §3.6.2 (From).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from publicsuffixlist import PublicSuffixList

from kithmail._core import Core, InvalidInputError, Membership, normalize_address
from kithmail.layers import Action, Layer, Verdict
from kithmail.layers.spoofing import dmarc
from kithmail.layers.spoofing.results import AuthResults
from kithmail.pipeline import MessageContext
from kithmail.spool import Outcome

__all__ = [
    "ORG_PREFIX",
    "Community",
    "authenticated_identity",
    "list_authenticated",
    "list_id",
    "org_user",
    "outcome",
]

# The organisation's entries live under a pseudo-user of the tenant. Every
# real user is an address and holds an "@"; this name never does, so no
# user can ever be named into the organisation's list (and the core folds
# it as a plain lower-case name).
ORG_PREFIX: Final = "tenant:"
MAX_LIST_ID: Final = 253  # a List-Id is a domain-like dot-atom (RFC 2919 §2)
_LOOSE: Final = frozenset({"none", "neutral"})


def org_user(tenant: str) -> str:
    """The pseudo-user holding a tenant's organisation-wide entries (`tenant:<name>`)."""
    return ORG_PREFIX + tenant


def _printable(s: str, limit: int = 200) -> str:
    s = "".join(c if " " <= c <= "~" else "?" for c in s)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _same_org(domain: str, org: str, psl: PublicSuffixList) -> bool:
    return bool(domain) and dmarc.org_domain(domain, psl) == org


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


# ---------------------------------------------------------------- the identity


def authenticated_identity(
    auth: AuthResults, *, require_auth: bool, psl: PublicSuffixList
) -> tuple[str | None, str]:
    """The header From address counted as authenticated, or None; and why.

    Exactly DESIGN.md's rule: DMARC pass; else, only where the From domain
    publishes no DMARC record (`dmarc=none`), SPF pass for an envelope
    sender of the same organisational domain, or a passing DKIM signature
    whose d= is of that organisational domain (relaxed alignment, as DMARC's
    default); else, with ``require_auth=False``, an identity about which
    every check is `none` or `neutral`. A DMARC fail, temperror or
    permerror, an SPF fail or softfail, a broken DKIM signature of the From
    domain: never. The address is returned folded as the community table
    folds it (lower case, A-label domain).
    """
    address = auth.header_from
    if not address or "@" not in address:
        return None, "no single header From address"
    shown = _printable(address)
    domain = _domain_of(address)
    org = dmarc.org_domain(domain, psl)
    try:
        folded = normalize_address(address)
    except InvalidInputError:
        # A quoted local part or the like: no community entry can name it.
        return None, f"the From address {shown} cannot be a community entry"
    m = auth.dmarc
    if m is None:
        return None, f"DMARC was not evaluated for {domain}"
    if m.from_domain.lower().rstrip(".") != domain:
        return None, f"the DMARC result is for {_printable(m.from_domain)!r}, not {domain}"
    if m.result == "pass":
        return folded, f"DMARC pass for {domain}"
    if m.result != "none":
        why = f": {_printable(m.reason)}" if m.reason else ""
        return None, f"DMARC {m.result} for {domain}{why}"

    # No DMARC record: the domain's own SPF or DKIM may still vouch for it.
    spf = auth.spf_mailfrom
    if spf is not None and spf.result == "pass" and _same_org(spf.domain, org, psl):
        return folded, (
            f"no DMARC record for {domain}; SPF pass for the envelope sender's "
            f"domain {_printable(spf.domain)}, of the same organisation"
        )
    own = [d for d in auth.dkim if _same_org(d.domain, org, psl)]
    passed = [d for d in own if d.result == "pass"]
    if passed:
        return folded, f"no DMARC record for {domain}; DKIM pass for {_printable(passed[0].domain)}"
    if require_auth:
        return None, (
            f"no DMARC record for {domain}, and neither SPF for an envelope sender of "
            f"{org} nor a DKIM signature of {org} passes"
        )

    # [community] require_auth = false: the seed's looser rule.
    # An SPF pass here is another organisation's (an ESP, a forwarder): it
    # says nothing about the From address, as `none` says nothing.
    spf_result = spf.result if spf is not None else "none"
    if spf_result not in _LOOSE and spf_result != "pass":
        return None, f"SPF {spf_result} for the envelope sender (require_auth = false)"
    bad = [d for d in own if d.result not in _LOOSE]
    if bad:
        return None, (
            f"DKIM {bad[0].result} for {_printable(bad[0].domain)} (require_auth = false)"
        )
    return folded, (
        f"require_auth = false: no DMARC record for {domain}, SPF {spf_result}, "
        f"no failing DKIM signature of {org}"
    )


# ---------------------------------------------------------------- List-Id


def list_id(header: Iterable[bytes]) -> str | None:
    """The List-Id's identifier (RFC 2919 §3), folded; None when absent or not one.

    The part inside the last angle brackets, else the whole value; it must
    be a dot-atom of at least two labels. Several List-Id fields name no
    list.
    """
    values = [v for name, v in dmarc.header_fields(header) if name == "list-id"]
    if len(values) != 1:
        return None
    value = values[0].strip()
    start, end = value.rfind("<"), value.rfind(">")
    ident = value[start + 1 : end] if 0 <= start < end else value
    ident = ident.strip().lower().rstrip(".")
    if not ident or len(ident) > MAX_LIST_ID or not ident.isascii():
        return None
    labels = ident.split(".")
    if len(labels) < 2 or not all(
        lab and all(c.isalnum() or c in "-_" for c in lab) for lab in labels
    ):
        return None
    return ident


def list_authenticated(auth: AuthResults, ident: str, psl: PublicSuffixList) -> str | None:
    """How the list `ident` vouches for the message, or None when it does not.

    A passing DKIM signature, or SPF pass for the envelope sender, of the
    List-Id's organisational domain.
    """
    org = dmarc.org_domain(ident, psl)
    for d in auth.dkim:
        if d.result == "pass" and _same_org(d.domain, org, psl):
            return f"DKIM pass for {_printable(d.domain)}"
    spf = auth.spf_mailfrom
    if spf is not None and spf.result == "pass" and _same_org(spf.domain, org, psl):
        return f"SPF pass for {_printable(spf.domain)}"
    return None


# ---------------------------------------------------------------- the layer


def outcome(earlier: Outcome, verdict: Verdict) -> Outcome:
    """One recipient's outcome: layers 1–4's stands unless it was to deliver."""
    if earlier is not Outcome.DELIVER or verdict.shadow:
        return earlier
    if verdict.action is Action.DISCARD:
        return Outcome.DISCARD
    if verdict.action is Action.QUARANTINE:
        return Outcome.QUARANTINE
    return Outcome.DELIVER


class Community:
    """Layer 5 of one process: the core's community table and the public suffix list."""

    def __init__(self, core: Core, *, psl: PublicSuffixList | None = None) -> None:
        self.core = core
        self.psl = psl if psl is not None else dmarc.default_psl()

    def decide(self, ctx: MessageContext, users: Sequence[str]) -> list[Verdict]:
        """One verdict per recipient user, in order (see the module's docstring).

        `users` are folded user addresses (the `+tag` already mapped to its
        user). Raises the core's `InvalidInputError` for a malformed user,
        and any `CoreError`: the caller cannot decide and answers 4xx.
        """
        if not users:
            return []
        cfg = ctx.policy.settings.community
        identity, why = authenticated_identity(
            ctx.auth, require_auth=cfg.require_auth, psl=self.psl
        )
        ident = list_id(ctx.header)
        list_how = list_authenticated(ctx.auth, ident, self.psl) if ident else None
        listed = ident if list_how is not None else None
        if identity is None and listed is None:
            claimed = _printable(ctx.auth.header_from) or "the message"
            detail = f"unauthenticated: {claimed}: {why}"
            if ident is not None:
                detail += f"; List-Id {ident} is not vouched for by its own domain"
            held = Verdict(Layer.COMMUNITY, Action.QUARANTINE, "community.unknown", detail)
            return [held] * len(users)

        org = org_user(ctx.policy.tenant) if ctx.policy.tenant else None
        # Without an authenticated author, only the list can match: ask with
        # an address of the reserved .invalid domain (RFC 6761) and keep
        # nothing but a list: match below.
        sender = identity if identity is not None else "nobody@unauthenticated.invalid"
        queries = [(user, sender, listed, org) for user in users]
        if len(queries) == 1:
            found = [self.core.community.member(*queries[0])]
        else:
            found = self.core.community.member_many(queries)
        return [
            self._verdict(user, m, identity, why, listed, list_how)
            for user, m in zip(users, found, strict=True)
        ]

    def _verdict(
        self,
        user: str,
        m: Membership,
        identity: str | None,
        why: str,
        listed: str | None,
        list_how: str | None,
    ) -> Verdict:
        entry = m.entry or ""
        # Without an authenticated author only a list entry may decide.
        m_status = "unknown" if identity is None and not entry.startswith("list:") else m.status
        if entry.startswith("list:"):
            who = f"the list {listed} ({list_how})"
        else:
            who = f"{identity} ({why})"
        if m_status == "unknown":
            if identity is None:
                detail = (
                    f"unauthenticated: {why}; the list {listed} ({list_how}) "
                    f"is not in the community of {user}"
                )
            else:
                detail = f"unknown: {identity} ({why}) is not in the community of {user}"
                if listed is not None:
                    detail += f", nor is the list {listed}"
            return Verdict(Layer.COMMUNITY, Action.QUARANTINE, "community.unknown", detail)
        scope = "the organisation's" if m.scope == "org" else f"{user}'s"
        if m_status == "blocked":
            return Verdict(
                Layer.COMMUNITY,
                Action.DISCARD,
                "community.blocked",
                f"{who}: blocked by {entry} on {scope} block list (source {m.source})",
            )
        return Verdict(
            Layer.COMMUNITY,
            Action.ACCEPT,
            "community.member",
            f"{who}: allowed by {entry} on {scope} allow list (source {m.source})",
        )
