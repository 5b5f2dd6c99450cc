"""Layer 1, Recon: defer a source never seen before; its retry passes.

Runs at RCPT TO, first of all layers, so most spam (which never retries)
costs no DNS query, scan or disk write. The state lives in the core's Recon
table (docs/core.md); this module turns its answer, the `[recon]` policy and
the few narrow exceptions of DESIGN.md into a `Verdict`:

- trusted networks, exempt networks and exempt recipients are never deferred;
- a never-seen source is let through at once only when SPF passes for its
  envelope sender and that sender is an exempt sender or a member of the
  recipient's community ("members at RCPT"), or when it is a pool-aware
  retry: mail from a sender domain deferred for this recipient at least
  `min_delay` ago, from a server that SPF authorises through a mechanism
  narrower than /16 (IPv4) or /32 (IPv6), never `+all`.

No other new source costs a DNS query. Trusts nothing from the client: the
sender and recipient are used only as table keys and after folding.
Standards: RFC 5321 §4.2.5 and §4.5.4.1 (4xx and retry), RFC 6647
(greylisting).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from kithmail import Core, InvalidInputError
from kithmail.config import Recon as ReconPolicy
from kithmail.layers import Action, Layer, SmtpReply, Verdict

__all__ = ["SpfAnswer", "SpfCheck", "check"]


@dataclass(frozen=True, slots=True)
class SpfAnswer:
    """What an SPF check said for (client IP, envelope sender).

    `network` is the prefix length of the mechanism that matched when it
    named addresses (`ip4:`, `ip6:`, `a`, `mx` with their CIDR length), None
    when it matched by other means; `all` is True when `all` matched.
    """

    result: Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
    network: int | None = None
    all: bool = False


SpfCheck = Callable[[str, str], Awaitable[SpfAnswer]]


@functools.lru_cache(maxsize=256)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    # Settings are immutable, so their network lists are parsed once, not per RCPT.
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def _in(ip: str, nets: Sequence[str]) -> bool:
    if not nets:
        return False
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in n for n in _networks(tuple(nets)) if n.version == addr.version)


def _matches(address: str, patterns: Sequence[str]) -> bool:
    """An address against `user@domain` and `@domain` patterns, case-folded."""
    a = address.lower()
    domain = a.rpartition("@")[2]
    for p in patterns:
        p = p.lower()
        if (p.startswith("@") and domain == p[1:]) or a == p:
            return True
    return False


def _narrow(spf: SpfAnswer, ip: str) -> bool:
    """A pass through a mechanism narrower than /16 (IPv4) or /32 (IPv6)."""
    if spf.result != "pass" or spf.all or spf.network is None:
        return False
    addr = ipaddress.ip_address(ip)
    v6 = isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is None
    return spf.network > (32 if v6 else 16)


def _accept(reason: str, detail: str = "") -> Verdict:
    return Verdict(Layer.RECON, Action.ACCEPT, reason, detail)


async def check(
    core: Core,
    policy: ReconPolicy,
    trusted_networks: Sequence[str],
    *,
    client_ip: str,
    mail_from: str,
    recipient: str,
    now: int,
    spf: SpfCheck,
) -> Verdict:
    """Recon's verdict for one recipient of one transaction.

    `mail_from` is the envelope sender ("" for the null sender),
    `recipient` the folded local recipient. `spf` is called only on the
    narrow paths above, at most once.
    """
    if not policy.enabled:
        return _accept("recon.disabled")
    if _in(client_ip, trusted_networks):
        return _accept("recon.trusted_network")
    if _in(client_ip, policy.exempt_networks):
        return _accept("recon.exempt_network")
    if _matches(recipient, policy.exempt_recipients):
        return _accept("recon.exempt_recipient")

    r = core.recon.check(client_ip, now)
    if r.lapsed:
        # Its last deferral was never retried: what spam engines leave
        # behind, counted for self-learned reputation (which may tag or
        # defer, never reject unless an admin says so).
        with contextlib.suppress(InvalidInputError):
            core.reputation.record(client_ip, "never_retried", now)
    if r.status in ("known", "exempt"):
        return _accept(f"recon.{r.status}")
    if r.status == "passed":
        return _accept("recon.passed", f"delayed {now - r.first_seen} s")

    verdict = await _narrow_paths(core, policy, client_ip, mail_from, recipient, now, spf)
    if verdict is None:
        verdict = _defer(
            core, policy, r.status, r.first_seen, r.recorded, mail_from, recipient, now
        )
    return verdict.in_shadow() if policy.mode == "shadow" and verdict.acts else verdict


async def _narrow_paths(
    core: Core,
    policy: ReconPolicy,
    ip: str,
    mail_from: str,
    recipient: str,
    now: int,
    spf: SpfCheck,
) -> Verdict | None:
    """The three ways a never-seen source passes at once; None when none applies."""
    if not mail_from or "@" not in mail_from:
        return None
    domain = mail_from.rpartition("@")[2].lower()
    exempt = _matches(mail_from, policy.exempt_senders)
    try:
        member = core.community.member(recipient, mail_from).status == "allowed"
        pending = core.recon.pending_get(domain, recipient, now)
    except InvalidInputError:
        return None  # a sender the tables cannot fold is no member and no retry
    retry_due = pending is not None and now - pending >= policy.min_delay
    if not (exempt or member or retry_due):
        return None
    answer = await spf(ip, mail_from)
    if answer.result != "pass":
        return None
    if exempt:
        return _accept("recon.exempt_sender", f"SPF pass for {domain}")
    if member:
        return _accept("recon.member", f"SPF pass for {domain}")
    if _narrow(answer, ip):
        return _accept("recon.pool_retry", f"retry from {domain}'s pool, SPF /{answer.network}")
    return None


def _defer(
    core: Core,
    policy: ReconPolicy,
    status: str,
    first_seen: int,
    recorded: bool,
    mail_from: str,
    recipient: str,
    now: int,
) -> Verdict:
    wait = max(1, int(policy.min_delay) - (now - first_seen))
    if mail_from and "@" in mail_from:
        # An unfoldable sender gets no pool-aware retry.
        with contextlib.suppress(InvalidInputError):
            core.recon.pending_add(mail_from.rpartition("@")[2], recipient, now)
    reason = "recon.new_source" if status == "new" else "recon.too_early"
    detail = f"first seen {now - first_seen} s ago" + ("" if recorded else "; not remembered")
    reply = SmtpReply(451, "4.7.1", f"Greylisted: this server is new to us, retry in {wait} s")
    return Verdict(Layer.RECON, Action.DEFER, reason, detail, reply)
