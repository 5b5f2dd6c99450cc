"""Layer 3, anti-spoofing: SPF at RCPT; DKIM, DMARC and ARC at the end of DATA.

SPF (`spf.py`) runs at the first RCPT that Recon and Reputation let
through — never before them, so a source Recon defers costs no DNS query —
for the MAIL FROM identity (the HELO identity for the null sender), and
acts as `[spf]` says for its result. At the end of DATA, `Spoofing.message`
runs the rest and returns one `Verdict` for the transaction:

- DKIM (`dkim.py`) verifies every signature (at most `[dkim] max_signatures`)
  and ARC (`arc.py`) validates a forwarded message's chain (at most
  `[arc] max_sets` sets), concurrently;
- DMARC (`dmarc.py`) evaluates the header From's policy with relaxed or
  strict alignment. With `[dmarc] enforce = true` a `fail` takes the
  policy's disposition: `p=reject` → reject (550 5.7.1), `p=quarantine` →
  quarantine, `p=none` → accept; a `fail` is accepted instead when the ARC
  chain passes and its newest sealer is in `[arc] trusted_sealers`
  (`dmarc.arc_override`). No From field, several From fields, or From
  addresses of several domains leave no author domain (RFC 7489 §6.6.1):
  rejected as `dmarc.bad_from`. A DNS failure looking up the policy is
  `temperror`, recorded and not acted on (SPF's `temperror`, at RCPT, is
  where a broken DNS is acted on); but when the policy is reject or
  quarantine and the key lookup of an aligned DKIM signature timed out,
  the message is deferred (451 4.4.3): it may well have passed;
- our own domains (`own.py`): mail from outside the trusted networks whose
  header From or envelope sender is a local domain, and which neither SPF
  nor an aligned DKIM pass authenticates, takes `[spoofing] own_domains`
  (default reject, 550 5.7.1), whether or not DMARC is published;
- `[dkim] fail` applies to a broken signature (`dkim=fail`: the body hash
  or the signature does not verify; not a missing, revoked or malformed
  key, which is the signer's problem, not a sign of tampering) only when
  nothing else authenticates the message: no DKIM signature passes, SPF
  does not pass for MAIL FROM, DMARC does not pass, and no trusted ARC
  sealer vouches for it.

The most severe verdict that acts decides (reject > defer > quarantine >
tag > accept; on a tie own-domain, then DMARC, then DKIM); when none acts,
the most severe shadow decision is returned (`shadow=True`), else an
accept naming what authenticated the message (`dmarc.pass`, `dkim.pass`,
…). `[dkim] mode` and `[dmarc] mode` = "shadow" record their decisions
without acting. The results go into the transaction's `AuthResults`
(`dkim`, `arc`, `dmarc`, `header_from`), from which the listener writes
one Authentication-Results header.

Every action reads its policy from the `TenantPolicy` of the recipients'
domain. Every DNS query goes through the one `kithmail.dns.Resolver`.
Standards: RFC 6376, 7489, 8617, 8601.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from publicsuffixlist import PublicSuffixList

from kithmail.dns import Resolver
from kithmail.layers import Action, Layer, SmtpReply, Verdict
from kithmail.layers.spoofing import arc, dkim, dmarc, own
from kithmail.layers.spoofing.results import (
    ArcResult,
    AuthResults,
    DkimResult,
    DmarcResult,
    SpfResult,
)

if TYPE_CHECKING:  # the pipeline imports this package; only the type is needed here
    from kithmail.pipeline import MessageContext

__all__ = ["ArcResult", "AuthResults", "DkimResult", "DmarcResult", "SpfResult", "Spoofing"]

_SEVERITY = (Action.ACCEPT, Action.TAG, Action.QUARANTINE, Action.DEFER, Action.REJECT)


def _reply(action: Action, reject: SmtpReply, defer: SmtpReply) -> SmtpReply | None:
    if action is Action.REJECT:
        return reject
    if action is Action.DEFER:
        return defer
    return None


def _sample_key(fields: list[tuple[str, str]]) -> str:
    """What `pct=` sampling hashes: the Message-ID, else From and Date."""
    mid = next((v.strip() for n, v in fields if n == "message-id"), "")
    if mid:
        return mid
    return "|".join(v.strip() for n, v in fields if n in ("from", "date"))


class Spoofing:
    """DKIM, DMARC, ARC and own-domain checks at the end of DATA; one per process."""

    def __init__(self, resolver: Resolver, *, psl: PublicSuffixList | None = None) -> None:
        self.resolver = resolver
        self.psl = psl if psl is not None else dmarc.default_psl()

    async def message(self, ctx: MessageContext) -> Verdict:
        """Check the message, fill `ctx.auth`, and return the deciding verdict."""
        settings = ctx.policy.settings
        auth = ctx.auth
        data = b"".join(ctx.data)
        auth.dkim, chain = await asyncio.gather(
            dkim.verify(data, self.resolver, max_signatures=settings.dkim.max_signatures),
            arc.verify(data, self.resolver, max_sets=settings.arc.max_sets),
        )
        if not auth.dkim:
            # Checked and found none: say so (RFC 8601 §2.7.1 dkim=none),
            # which an empty list (not checked) would not.
            auth.dkim = [DkimResult("none", "")]
        auth.arc = chain
        fields = dmarc.header_fields(ctx.header)
        who = dmarc.author(ctx.header)
        auth.header_from = who.address
        # RFC 7489 §4.1 / RFC 7208 §2.4: for the null sender, SPF's MAIL FROM
        # identity is postmaster@HELO, which the SPF check recorded as HELO.
        spf = auth.spf_mailfrom or (auth.spf_helo if not ctx.mail_from else None)
        trusted_arc = auth.arc.result == "pass" and auth.arc.sealer in settings.arc.trusted_sealers

        dmarc_v = await self._dmarc(ctx, who, spf, fields, trusted_arc)
        dkim_v = self._dkim(ctx, spf, trusted_arc)
        own_v = self._own(ctx, who, spf)
        verdicts = [v for v in (own_v, dmarc_v, dkim_v) if v is not None]

        summary = auth.summary()
        acting = [v for v in verdicts if v.acts]
        if acting:
            return _with_summary(_most_severe(acting), summary)
        shadows = [v for v in verdicts if v.shadow and v.action is not Action.ACCEPT]
        if shadows:
            return _with_summary(_most_severe(shadows), summary)
        if dmarc_v is not None and dmarc_v.reason in ("dmarc.pass", "dmarc.arc_override"):
            return _with_summary(dmarc_v, summary)
        passed = [d for d in auth.dkim if d.result == "pass"]
        if passed:
            return Verdict(
                Layer.SPOOFING,
                Action.ACCEPT,
                "dkim.pass",
                f"DKIM pass for {', '.join(dict.fromkeys(d.domain for d in passed))}; {summary}",
            )
        if dmarc_v is not None:
            return _with_summary(dmarc_v, summary)
        first = auth.dkim[0].result if auth.dkim else "none"
        return Verdict(Layer.SPOOFING, Action.ACCEPT, f"dkim.{first}", summary)

    # ------------------------------------------------------------ DMARC

    async def _dmarc(
        self,
        ctx: MessageContext,
        who: dmarc.Author,
        spf: SpfResult | None,
        fields: list[tuple[str, str]],
        trusted_arc: bool,
    ) -> Verdict | None:
        cfg = ctx.policy.settings.dmarc
        auth = ctx.auth
        if who.problem:
            auth.dmarc = DmarcResult("permerror", "", reason=who.problem)
            v = Verdict(
                Layer.SPOOFING,
                Action.REJECT if cfg.enforce else Action.ACCEPT,
                "dmarc.bad_from",
                f"no single author domain (RFC 7489 §6.6.1): {who.problem}",
                SmtpReply(550, "5.7.1", f"Message refused: {who.problem} (RFC 5322 needs one)"),
            )
            return v.in_shadow() if cfg.mode == "shadow" and v.acts else v

        ev = await dmarc.evaluate(
            self.resolver,
            self.psl,
            who.domain,
            spf=spf,
            dkim=auth.dkim,
            sample_key=_sample_key(fields),
        )
        res = ev.result
        domain = res.from_domain
        action, reason, detail = Action.ACCEPT, f"dmarc.{res.result}", ""
        reply: SmtpReply | None = None
        if res.result == "pass":
            via = [w for w, ok in (("SPF", res.spf_aligned), ("DKIM", res.dkim_aligned)) if ok]
            detail = f"DMARC pass for {domain} through aligned {' and '.join(via)}"
        elif res.result == "temperror":
            # Recorded, not acted on: a DNS failure says nothing about the
            # message, and one broken enough to matter has already made
            # SPF temperror at RCPT, which [spf] temperror acts on.
            detail = f"DMARC result of {domain} unknown: {res.reason}"
            if ev.disposition in ("reject", "quarantine"):
                # The policy is known and strict, and an aligned signature
                # could not be checked: the sender retries; neither refused
                # nor let through unverified.
                action = Action.DEFER
                reply = SmtpReply(
                    451, "4.4.3", "Could not verify the sender's DKIM signature; try again later"
                )
        elif res.result == "fail":
            disposition = ev.disposition or "none"
            detail = f"DMARC fail for {domain} (p={res.policy}): {res.reason}"
            if trusted_arc and auth.arc is not None:
                sealer = auth.arc.sealer
                auth.dmarc = dmarc.with_reason(
                    res, f"{res.reason}; overridden: ARC pass sealed by trusted {sealer}"
                )
                return Verdict(
                    Layer.SPOOFING,
                    Action.ACCEPT,
                    "dmarc.arc_override",
                    f"{detail}; overridden: the ARC chain ({auth.arc.sets} sets) passes "
                    f"and its sealer {sealer} is in [arc] trusted_sealers",
                )
            if disposition == "reject":
                action, reason = Action.REJECT, "dmarc.reject"
                reply = SmtpReply(
                    550,
                    "5.7.1",
                    f"Unauthenticated mail from {domain} is refused by its DMARC policy",
                )
            elif disposition == "quarantine":
                action, reason = Action.QUARANTINE, "dmarc.quarantine"
            else:
                reason = "dmarc.fail"
            if ev.sampled_out:
                detail += f" ({res.reason})"
        else:  # none, permerror
            detail = f"DMARC {res.result} for {domain}: {res.reason}"
        auth.dmarc = res
        if not cfg.enforce and action is not Action.ACCEPT:
            # Evaluated and recorded, never acted on: the reason names the
            # result, not a disposition that did not happen.
            detail += f"; not enforced ([dmarc] enforce = false), would {action}"
            action, reply = Action.ACCEPT, None
            reason = f"dmarc.{res.result}"
        v = Verdict(Layer.SPOOFING, action, reason, detail, reply)
        return v.in_shadow() if cfg.mode == "shadow" and v.action is not Action.ACCEPT else v

    # ------------------------------------------------------------ DKIM

    def _dkim(
        self, ctx: MessageContext, spf: SpfResult | None, trusted_arc: bool
    ) -> Verdict | None:
        cfg = ctx.policy.settings.dkim
        auth = ctx.auth
        broken = [d for d in auth.dkim if d.result == "fail"]
        if not broken:
            return None
        vouched = (
            any(d.result == "pass" for d in auth.dkim)
            or (spf is not None and spf.result == "pass")
            or (auth.dmarc is not None and auth.dmarc.result == "pass")
            or trusted_arc
        )
        what = "; ".join(f"{d.domain}: {d.reason}" for d in broken)
        if vouched:
            return Verdict(
                Layer.SPOOFING,
                Action.ACCEPT,
                "dkim.fail",
                f"broken DKIM signature ({what}), but the message is otherwise authenticated",
            )
        action = Action(cfg.fail)
        v = Verdict(
            Layer.SPOOFING,
            action,
            "dkim.fail",
            f"broken DKIM signature ({what}) and nothing else authenticates the message",
            _reply(
                action,
                SmtpReply(550, "5.7.1", "DKIM signature did not verify"),
                SmtpReply(451, "4.7.5", "DKIM signature did not verify; try again later"),
            ),
        )
        return v.in_shadow() if cfg.mode == "shadow" and v.action is not Action.ACCEPT else v

    # ------------------------------------------------------------ own domains

    def _own(self, ctx: MessageContext, who: dmarc.Author, spf: SpfResult | None) -> Verdict | None:
        settings = ctx.policy.settings
        if not ctx.local_domains or not own.from_outside(
            ctx.client_ip, settings.domains.trusted_networks
        ):
            return None
        claims = own.unauthenticated_claims(
            from_domains=[d for _, d in who.addresses],
            mail_from=ctx.mail_from,
            local_domains=ctx.local_domains,
            spf=spf,
            dkim=ctx.auth.dkim,
            psl=self.psl,
        )
        if not claims:
            return None
        c = claims[0]
        action = Action(settings.spoofing.own_domains)
        detail = "; ".join(
            f"{x.where} {x.domain} claims our domain {x.local} from outside, "
            "and neither SPF nor an aligned DKIM signature authenticates it"
            for x in claims
        )
        v = Verdict(
            Layer.SPOOFING,
            action,
            "spoofing.own_domain",
            detail,
            _reply(
                action,
                SmtpReply(
                    550, "5.7.1", f"Mail from {c.domain} must be authenticated by its own servers"
                ),
                SmtpReply(
                    451, "4.7.1", f"Mail from {c.domain} is not authenticated; try again later"
                ),
            ),
        )
        return v.in_shadow() if settings.spoofing.mode == "shadow" and v.acts else v


def _most_severe(verdicts: list[Verdict]) -> Verdict:
    # max() keeps the first of equals: own-domain, then DMARC, then DKIM.
    return max(verdicts, key=lambda v: _SEVERITY.index(v.action) if v.action in _SEVERITY else 0)


def _with_summary(v: Verdict, summary: str) -> Verdict:
    return Verdict(v.layer, v.action, v.reason, f"{v.detail} [{summary}]", v.reply, v.shadow)
