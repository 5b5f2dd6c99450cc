"""Layer 2, Reputation: the client address at RCPT against local lists, DNSBLs
and what the gateway has learned about it.

In order, first decision wins:

1. a local allow list match (the core's table) → accept, and the address
   skips Recon too (`skips_recon`); nothing else is asked;
2. a local block list match (longest prefix) → that list's action;
   no DNS query is made when a local list decided;
3. the configured DNSBLs (`[reputation] dnsbl`), all asked at once: an A
   answer in 127.0.0.0/8 is a listing → `on_listed`; the learned score
   (event counters in the core) at or over `learned_threshold` →
   `learned_action`. When both apply the more severe action wins. A learned
   `reject` (which only an admin configures) needs no DNS answer, so none
   is asked.

A DNSBL that times out, fails, or answers with a 127.255.255.x code
(Spamhaus's "query refused / blocked" answers) has not listed the address:
the mail goes on, the detail says which zone could not be asked, and the
error is logged. In shadow mode (`mode = "shadow"`) the same verdict comes
back marked `.shadow`, and the allow list does not exempt from Recon.

Trusts the core's lists and the configured zones; trusts nothing in a DNSBL
answer beyond "127.0.0.0/8 means listed". Trusted networks never reach this
layer (the caller skips it). Standards: RFC 5782 (DNS blacklists: reversed
IPv4 octets, reversed IPv6 nibbles, 127.0.0.2 test entry), RFC 3463
(enhanced status codes).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from kithmail import config
from kithmail._core import Core, RepMatch
from kithmail.dns import Resolver, Status
from kithmail.layers import Action, Layer, SmtpReply, Verdict

__all__ = ["LEARNED_EVENTS", "Reputation", "dnsbl_name"]

log = logging.getLogger("kithmail.reputation")

# The core's event counters that count against an address (other layers
# record them with `core.reputation.record(ip, event, now)`).
# `unknown_recipient`: an RCPT to a user who does not exist (a dictionary
# attack's trace); `never_retried`: a Recon deferral the source never
# retried within the retry window (what a spam engine leaves behind).
LEARNED_EVENTS: frozenset[str] = frozenset({"spam", "virus", "unknown_recipient", "never_retried"})

_LISTED = ipaddress.IPv4Network("127.0.0.0/8")
_REFUSED = ipaddress.IPv4Network("127.255.255.0/24")

# Least to most severe: when two checks apply, the later in this order wins.
_SEVERITY = [Action.ACCEPT, Action.TAG, Action.QUARANTINE, Action.DEFER, Action.REJECT]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(ip: str | Address) -> Address:
    a = ipaddress.ip_address(ip)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def dnsbl_name(ip: str | Address, zone: str) -> str:
    """The name to ask a DNSBL: d.c.b.a.zone, or 32 reversed nibbles.zone (RFC 5782)."""
    a = _address(ip)
    if isinstance(a, ipaddress.IPv4Address):
        labels = reversed(str(a).split("."))
    else:
        labels = reversed(a.exploded.replace(":", ""))
    return ".".join([*labels, zone])


@dataclass(frozen=True, slots=True)
class _Zone:
    zone: str
    listed: tuple[str, ...] = ()  # the 127.0.0.0/8 answers that list
    error: str = ""  # why the zone could not be asked ("" when it answered)


def _reply(action: Action, text: str) -> SmtpReply | None:
    if action is Action.REJECT:
        return SmtpReply(554, "5.7.1", text)
    if action is Action.DEFER:
        return SmtpReply(451, "4.7.1", text + "; try again later")
    return None  # accept, tag, quarantine: the RCPT is accepted


class Reputation:
    """Layer 2 for one policy: build once, call `check(ip)` at each RCPT.

    `policy` is the `[reputation]` section in force (a tenant's, once
    tenants override it); `resolver` is the process's one resolver.
    """

    def __init__(
        self,
        core: Core,
        policy: config.Reputation,
        resolver: Resolver,
        *,
        learned_events: Iterable[str] = LEARNED_EVENTS,
    ) -> None:
        self._table = core.reputation
        self._policy = policy
        self._resolver = resolver
        self._learned_events = frozenset(learned_events)

    @classmethod
    def from_settings(cls, core: Core, settings: config.Settings, resolver: Resolver) -> Reputation:
        return cls(core, settings.reputation, resolver)

    @property
    def shadow(self) -> bool:
        return self._policy.mode == "shadow"

    def allowlisted(self, ip: str | Address) -> Verdict | None:
        """The accept verdict when a local allow list holds `ip`, else None.

        Local and fast (one table lookup, no DNS): the caller asks it before
        Recon. In shadow mode the verdict is marked `.shadow`.
        """
        a = _address(ip)
        m = self._table.lookup(str(a))
        if m is None or m.kind != "allow":
            return None
        return self._mark(self._local(a, m))

    def skips_recon(self, ip: str | Address) -> bool:
        """True when Recon must not defer `ip`: allow-listed, and not in shadow mode."""
        v = self.allowlisted(ip)
        return v is not None and not v.shadow

    async def check(self, ip: str | Address) -> Verdict:
        """Layer 2's verdict for the client address `ip` (text, IPv4 or IPv6)."""
        # Only the parsed address reaches a reply or a log line, never the
        # caller's text (which came from a client, perhaps via XCLIENT).
        a = _address(ip)
        ip = str(a)
        m = self._table.lookup(ip)
        if m is not None:
            return self._mark(self._local(a, m))

        learned = self._learned(a)
        if learned is not None and learned.action is Action.REJECT:
            return self._mark(learned)  # nothing a DNSBL says could be worse

        zones = await asyncio.gather(*(self._ask(a, z) for z in self._policy.dnsbl))
        listed = next((z for z in zones if z.listed), None)
        failed = [z for z in zones if z.error]
        unasked = "; ".join(f"{z.zone}: {z.error}" for z in failed)

        verdict: Verdict | None = None
        if listed is not None:
            action = Action(self._policy.on_listed)
            codes = ", ".join(listed.listed)
            verdict = Verdict(
                Layer.REPUTATION,
                action,
                "reputation.dnsbl",
                f"{ip} listed by {listed.zone} ({codes})",
                _reply(
                    action, f"Service unavailable; client host [{ip}] blocked using {listed.zone}"
                ),
            )
        if learned is not None and (
            verdict is None or _SEVERITY.index(learned.action) > _SEVERITY.index(verdict.action)
        ):
            verdict = learned
        if verdict is None:
            if failed:
                verdict = Verdict(
                    Layer.REPUTATION,
                    Action.ACCEPT,
                    "reputation.dnsbl_error",
                    f"{ip} accepted without an answer from {unasked}",
                )
            else:
                n = len(zones)
                verdict = Verdict(
                    Layer.REPUTATION,
                    Action.ACCEPT,
                    "reputation.clean",
                    f"{ip} on no local list, no DNSBL ({n} asked), learned score under threshold",
                )
        elif failed:
            verdict = Verdict(
                verdict.layer,
                verdict.action,
                verdict.reason,
                f"{verdict.detail}; not answered: {unasked}",
                verdict.reply,
            )
        return self._mark(verdict)

    # ------------------------------------------------------------ the checks

    def _local(self, a: Address, m: RepMatch) -> Verdict:
        ip = str(a)
        if m.kind == "allow":
            return Verdict(
                Layer.REPUTATION,
                Action.ACCEPT,
                "reputation.allowlisted",
                f"{ip} is on allow list {m.list} ({m.prefix})",
            )
        detail = f"{ip} is on local list {m.list} ({m.prefix})"
        try:
            action = Action(m.action)
        except ValueError:
            action = Action.DISCARD  # flagged just below
        if action is Action.DISCARD:
            # A list loaded with an action this layer cannot take: a fault on
            # our side, so a 4xx (STYLE.md §4), never a silent accept.
            log.error("local list %s has action %r; deferring %s", m.list, m.action, ip)
            action, detail = Action.DEFER, f"{detail}; its action {m.action!r} is not valid here"
        return Verdict(
            Layer.REPUTATION,
            action,
            "reputation.local_list",
            detail,
            _reply(action, f"Client host [{ip}] is on a local block list"),
        )

    def _learned(self, a: Address) -> Verdict | None:
        ip = str(a)
        counters = self._table.counters(ip)
        score = sum(counters.get(e, (0, 0))[0] for e in self._learned_events)
        threshold = self._policy.learned_threshold
        if score < threshold:
            return None
        action = Action(self._policy.learned_action)
        return Verdict(
            Layer.REPUTATION,
            action,
            "reputation.learned",
            f"{ip} scored {score} (threshold {threshold}) from "
            + ", ".join(
                f"{e}={counters[e][0]}" for e in sorted(self._learned_events & counters.keys())
            ),
            _reply(action, f"Client host [{ip}] has a poor reputation here"),
        )

    async def _ask(self, a: Address, zone: str) -> _Zone:
        res = await self._resolver.a(dnsbl_name(a, zone))
        if res.status is Status.NXDOMAIN or res.status is Status.NODATA:
            return _Zone(zone)
        if res.status is not Status.ANSWER:
            log.warning("DNSBL %s not answered for %s: %s (%s)", zone, a, res.status, res.detail)
            return _Zone(zone, error=f"{res.status} ({res.detail})")
        listed: list[str] = []
        odd: list[str] = []
        for r in res.records:
            code = ipaddress.IPv4Address(r)
            if code in _LISTED and code not in _REFUSED:
                listed.append(r)
            else:
                odd.append(r)
        if odd:
            # 127.255.255.x: the list refused us (a public resolver, a
            # rate limit, a bad zone name); anything outside 127/8 is not a
            # DNSBL answer at all. Neither lists the address.
            log.error("DNSBL %s answered %s for %s: not a listing", zone, ", ".join(odd), a)
            if not listed:
                return _Zone(zone, error=f"refused or unexpected answer {', '.join(odd)}")
        return _Zone(zone, tuple(listed))

    def _mark(self, v: Verdict) -> Verdict:
        return v.in_shadow() if self.shadow else v
