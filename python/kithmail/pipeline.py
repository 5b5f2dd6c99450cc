"""The layers in their order, as the SMTP listener runs them.

RCPT TO: Recon (1) then Reputation (2), each returning a `Verdict`; the
first that acts decides the RCPT reply. End of DATA: the message layers
(anti-spoofing's DKIM/DMARC (3) and anti-virus (4), added by their issues
through `message_layers`) give one action for the transaction, then each
recipient gets its outcome (the community, layer 5, chooses per recipient
when it arrives; until then an accepted message is delivered). A layer
never writes to the socket: this module turns verdicts into outcomes and
replies, and the listener sends them.

Every layer reads its policy from the `TenantPolicy` of the recipient's
domain (`kithmail.tenants`), never from the global settings directly.

Trusts: the client address and the folded addresses it is given (parsed by
`kithmail.smtp.addresses`).
"""

from __future__ import annotations

import collections
import ipaddress
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kithmail import Core, config
from kithmail.dns import Resolver
from kithmail.layers import Action, Layer, SmtpReply, Verdict
from kithmail.layers import recon as recon_layer
from kithmail.layers.recon import SpfCheck
from kithmail.layers.reputation import LEARNED_EVENTS, Reputation
from kithmail.layers.spoofing.results import AuthResults
from kithmail.metrics import Metrics
from kithmail.spool import Outcome
from kithmail.tenants import TenantPolicy

if TYPE_CHECKING:  # the community layer reads MessageContext from here
    from kithmail.layers.community import Community

__all__ = ["LEARNED", "MessageContext", "MessageLayer", "Pipeline", "TransactionVerdict"]

# Events that count against a source for self-learned reputation
# (`kithmail.layers.reputation.LEARNED_EVENTS`).
LEARNED: frozenset[str] = LEARNED_EVENTS

# Distinct [reputation] sections whose layer objects are kept (tenants
# with overrides of their own each have one).
REPUTATIONS_KEPT = 1024

# Least to most severe: when several verdicts act, the most severe decides.
SEVERITY = (Action.ACCEPT, Action.TAG, Action.QUARANTINE, Action.DEFER, Action.REJECT)


@dataclass(frozen=True, slots=True)
class MessageContext:
    """What a message layer sees at end of DATA."""

    policy: TenantPolicy
    client_ip: str
    helo: str
    mail_from: str
    recipients: tuple[str, ...]
    header: tuple[bytes, ...]  # the header lines, our own fields already removed
    data: Sequence[bytes]  # the message as received, one line per item, CRLF kept
    auth: AuthResults = field(default_factory=AuthResults)  # SPF from RCPT; layers add theirs
    local_domains: frozenset[str] = frozenset()  # every local domain of the gateway, folded
    trusted: bool = False  # from a trusted network: anti-spoofing does not judge it


MessageLayer = Callable[[MessageContext], Awaitable[Verdict]]
# SPF at RCPT: (the [spf] policy, the transaction's results, client IP, HELO,
# MAIL FROM) -> the verdict; it records its results in the AuthResults.
SpfLayer = Callable[[config.Spf, AuthResults, str, str, str], Awaitable[Verdict]]


@dataclass(slots=True)
class TransactionVerdict:
    """End of DATA: the deciding verdict (None: accept) and all that was recorded."""

    decisive: Verdict | None
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def reply(self) -> SmtpReply | None:
        d = self.decisive
        if d is None or d.action not in (Action.DEFER, Action.REJECT):
            return None
        return d.reply or (
            SmtpReply(451, "4.7.0", "Try again later")
            if d.action is Action.DEFER
            else SmtpReply(554, "5.7.1", "Message refused")
        )

    @property
    def outcome(self) -> Outcome:
        d = self.decisive
        if d is not None and d.action is Action.QUARANTINE:
            return Outcome.QUARANTINE
        return Outcome.DELIVER


def _net_list(cidrs: Sequence[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def in_networks(ip: str, nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in n for n in nets if n.version == addr.version)


def most_severe(verdicts: Sequence[Verdict]) -> Verdict | None:
    acting = [v for v in verdicts if v.acts]
    if not acting:
        return None
    return max(acting, key=lambda v: SEVERITY.index(v.action) if v.action in SEVERITY else 0)


class Pipeline:
    """The layers of one process, built once per settings (a reload builds a new one)."""

    def __init__(
        self,
        settings: config.Settings,
        core: Core,
        resolver: Resolver,
        spf: SpfCheck,
        *,
        metrics: Metrics | None = None,
        spf_layer: SpfLayer | None = None,
        message_layers: Sequence[MessageLayer] = (),
        trusted_message_layers: Sequence[MessageLayer] = (),
        community: Community | None = None,
    ) -> None:
        self.settings = settings
        self.core = core
        self.resolver = resolver
        self.spf = spf
        self.metrics = metrics
        self.spf_layer = spf_layer
        # Layers 3 (anti-spoofing) judges mail from outside only; layer 4
        # (anti-virus) judges everyone's: a virus from inside is a virus.
        self.message_layers = tuple(message_layers)
        self.trusted_message_layers = tuple(trusted_message_layers)
        self.community = community
        self.trusted = _net_list(settings.domains.trusted_networks)
        self.upstreams = _net_list(settings.server.trusted_upstreams)
        # One Reputation per distinct [reputation] section in force (the
        # file's, or a tenant's with overrides), keyed by the section's id
        # with the section itself kept beside it: an id alone may be reused
        # by a new section once an old one is freed after a reload or an
        # override change. Bounded: least recently used goes first.
        self._reputation: collections.OrderedDict[int, tuple[config.Reputation, Reputation]] = (
            collections.OrderedDict()
        )

    def is_trusted(self, ip: str) -> bool:
        return in_networks(ip, self.trusted)

    def is_upstream(self, ip: str) -> bool:
        return in_networks(ip, self.upstreams)

    def reputation(self, policy: TenantPolicy) -> Reputation:
        section = policy.settings.reputation
        key = id(section)
        hit = self._reputation.get(key)
        if hit is not None and hit[0] is section:
            self._reputation.move_to_end(key)
            return hit[1]
        rep = Reputation(self.core, section, self.resolver, learned_events=LEARNED)
        self._reputation[key] = (section, rep)
        while len(self._reputation) > REPUTATIONS_KEPT:
            self._reputation.popitem(last=False)
        return rep

    def _timed(self, layer: str, t0: float) -> None:
        if self.metrics is not None:
            self.metrics.layer_seconds.labels("smtp", layer).observe(time.perf_counter() - t0)

    def _count(self, v: Verdict) -> Verdict:
        if self.metrics is not None:
            self.metrics.verdict(str(v.layer), str(v.action), v.shadow)
        return v

    async def rcpt(
        self,
        policy: TenantPolicy,
        *,
        client_ip: str,
        trusted: bool,
        mail_from: str,
        recipient: str,
        now: int,
        skip_recon: bool = False,
    ) -> list[Verdict]:
        """Layers 1 and 2 for one recipient; the last verdict that acts decides.

        Trusted networks skip both (DESIGN.md); a local allow-list match
        skips Recon and the rest of Reputation.
        """
        if trusted:
            return []
        rep = self.reputation(policy)
        allow = rep.allowlisted(client_ip)
        if allow is not None and not allow.shadow:
            return [self._count(allow)]
        out: list[Verdict] = [] if allow is None else [self._count(allow)]
        if skip_recon:  # a reply to a valid SAV token (DESIGN.md): Reputation only
            out.append(self._count(await rep.check(client_ip)))
            return out
        t0 = time.perf_counter()
        rv = await recon_layer.check(
            self.core,
            policy.settings.recon,
            (),
            client_ip=client_ip,
            mail_from=mail_from,
            recipient=recipient,
            now=now,
            spf=self.spf,
        )
        self._timed("recon", t0)
        out.append(self._count(rv))
        if rv.acts:
            return out
        t0 = time.perf_counter()
        out.append(self._count(await rep.check(client_ip)))
        self._timed("reputation", t0)
        return out

    async def rcpt_spf(
        self, policy: TenantPolicy, auth: AuthResults, *, client_ip: str, helo: str, mail_from: str
    ) -> Verdict | None:
        """Layer 3's SPF, at the first RCPT layers 1 and 2 let through (once per transaction)."""
        if self.spf_layer is None:
            return None
        t0 = time.perf_counter()
        v = await self.spf_layer(policy.settings.spf, auth, client_ip, helo, mail_from)
        self._timed("spf", t0)
        return self._count(v)

    async def message(self, ctx: MessageContext) -> TransactionVerdict:
        """Layers 3 and 4 at end of DATA: one action for the whole transaction."""
        verdicts: list[Verdict] = []
        layers = self.trusted_message_layers if ctx.trusted else self.message_layers
        for layer in layers:
            t0 = time.perf_counter()
            v = self._count(await layer(ctx))
            self._timed(str(v.layer), t0)
            verdicts.append(v)
        return TransactionVerdict(most_severe(verdicts), verdicts)

    def recipients(self, ctx: MessageContext, users: Sequence[str]) -> list[Verdict]:
        """Layer 5: one verdict per recipient user (deliver, hold or discard).

        Mail from a trusted network is not judged by layer 3, so nothing
        in its AuthResults authenticates its From; the network vouches for
        a From in one of our own domains (our own servers), and such mail
        is delivered as a colleague's. Any other From on trusted-network
        mail is judged like mail from outside (an unauthenticated identity:
        held, never challenged).
        """
        if self.community is None:
            return [Verdict(Layer.COMMUNITY, Action.ACCEPT, "community.off")] * len(users)
        if ctx.trusted:
            from kithmail.layers.spoofing.dmarc import author as dmarc_author

            who = dmarc_author(ctx.header)
            if not who.problem and all(d in ctx.local_domains for _, d in who.addresses):
                v = Verdict(
                    Layer.COMMUNITY,
                    Action.ACCEPT,
                    "community.trusted_colleague",
                    f"From {who.domain} on mail from a trusted network",
                )
                return [self._count(v)] * len(users)
        t0 = time.perf_counter()
        shadow = ctx.policy.settings.community.mode == "shadow"
        out = [
            self._count(v.in_shadow() if shadow and v.acts else v)
            for v in self.community.decide(ctx, users)
        ]
        self._timed("community", t0)
        return out


def rcpt_reply(v: Verdict) -> SmtpReply:
    """The RCPT reply for a verdict that acts with defer or reject."""
    if v.reply is not None:
        return v.reply
    if v.action is Action.DEFER:
        return SmtpReply(451, "4.7.1", "Try again later")
    return SmtpReply(550, "5.7.1", "Refused by policy")


def unknown_recipient() -> Verdict:
    return Verdict(
        Layer.REPUTATION,
        Action.REJECT,
        "recipient.unknown",
        reply=SmtpReply(550, "5.1.1", "No such user here"),
    )
