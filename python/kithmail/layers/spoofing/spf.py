"""Layer 3's SPF: the MAIL FROM and HELO identities, acted on as `[spf]` says.

Runs at the first RCPT that Recon and Reputation let through (the caller
sees to that), once per transaction. It evaluates:

- the MAIL FROM identity (RFC 7208 §2.4), whose result decides;
- the HELO identity (§2.3) when the HELO is a domain name, recorded beside
  it (for the Authentication-Results header and DMARC), checked at the same
  time so it costs no extra wait;
- for the null sender, only the HELO identity, `postmaster@<helo>`, which
  §2.4 makes the MAIL FROM identity too: it decides, and is recorded as
  `auth.spf_helo` (`auth.spf_mailfrom` stays None — DMARC and the header
  read the HELO result for a null sender).

The verdict's action is `policy.action_for(result)`, its reason
`spf.<result>`; a reject answers 550, a defer 451, with the enhanced
status codes of RFC 7372: x.7.24 ("SPF validation error") for temperror
and permerror, x.7.23 ("SPF validation failed") for the results a
domain's policy gave. In shadow mode a verdict that would act is marked
shadow and changes nothing.

Trusts nothing from the client or the DNS: the HELO and sender reach the
reply text only when they are plain domain names, and the detail (logs,
quarantine) shows them escaped. Every query goes to `[dns] nameservers`
with `[dns] timeout` through `SpfChecker`; a timeout is `temperror`, acted
on as configured, never a hang.
Standards: RFC 7208 (SPF), RFC 7372 (enhanced status codes for SPF),
RFC 3463, RFC 5321 §4.1.4 (HELO).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Literal

from kithmail import config
from kithmail.layers import Action, Layer, SmtpReply, Verdict
from kithmail.layers.spoofing.results import AuthResults, SpfResult
from kithmail.spf import SpfChecker, SpfEvaluation

__all__ = ["check", "for_pipeline", "helo_domain", "shown"]

# A multi-label domain name of letters, digits, '-' and '_' (RFC 7208 §4.3
# leaves anything else to "none"), not an address: the last label has a letter.
_DOMAIN = re.compile(
    r"(?=.{1,253}$)(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)+"
    r"[A-Za-z0-9_-]*[A-Za-z_-][A-Za-z0-9_-]*"
)
_SHOWN_MAX = 120


def helo_domain(helo: str) -> str | None:
    """The HELO name folded to lower case when it is a domain name, else None.

    An address literal ("[192.0.2.1]"), a bare address or a single label
    has no HELO identity to check (RFC 7208 §2.3, §4.3).
    """
    h = helo.strip().rstrip(".")
    return h.lower() if _DOMAIN.fullmatch(h) else None


def shown(value: str) -> str:
    """A client- or DNS-supplied string as it may appear in a log or the quarantine.

    Printable ASCII stays, except the backslash; everything else (CR, LF,
    NUL, quotes' look-alikes, non-ASCII) is an escape, and the text is cut.
    """
    cut = value[:_SHOWN_MAX]
    out = "".join(
        c if " " <= c <= "~" and c != "\\" else c.encode("unicode_escape").decode("ascii")
        for c in cut
    )
    return out + ("..." if len(value) > _SHOWN_MAX else "")


def _in_reply(domain: str) -> str | None:
    """A domain fit to be written in our reply: a plain domain name, else None."""
    return domain.lower() if domain and _DOMAIN.fullmatch(domain) else None


def _why(ev: SpfEvaluation) -> str:
    """What decided, in a few words (the SpfResult detail, the header's reason)."""
    match ev.result:
        case "none":
            return ev.explanation or "no SPF record"
        case "temperror" | "permerror":
            text = ev.explanation.split(": ", 1)[1] if ": " in ev.explanation else ev.explanation
            return shown(text)
        case _:
            return f"matched {shown(ev.mechanism)}" if ev.mechanism else "no mechanism matched"


def _result(identity: Literal["mailfrom", "helo"], ev: SpfEvaluation, client_ip: str) -> SpfResult:
    return SpfResult(identity, ev.domain, ev.result, client_ip, ev.network, ev.all, _why(ev))


def _reply(action: Action, ev: SpfEvaluation, identity: str) -> SmtpReply | None:
    if action not in (Action.REJECT, Action.DEFER):
        return None
    res = ev.result
    err = res in ("temperror", "permerror")
    code, cls = (550, "5") if action is Action.REJECT else (451, "4")
    status = f"{cls}.7.{24 if err else 23}"
    who = _in_reply(ev.domain)
    whose = f"{who}'s" if who else f"the {identity}'s"
    if res == "temperror":
        text = f"SPF temperror: could not look up {whose} SPF policy"
    elif res == "permerror":
        text = f"SPF permerror: {whose} SPF policy is broken"
    elif res == "pass":
        text = "SPF pass, but mail through this server is not accepted here"
    else:
        text = (
            f"SPF {res}: {who or f'the {identity}'} does not authorize this server to send its mail"
        )
    if action is Action.DEFER:
        text += "; try again later"
    return SmtpReply(code, status, text)


async def check(
    checker: SpfChecker,
    policy: config.Spf,
    auth: AuthResults,
    *,
    client_ip: str,
    helo: str,
    mail_from: str,
) -> Verdict:
    """SPF's verdict for one transaction; the results go into `auth`.

    `mail_from` is the envelope sender ("" for the null sender), `helo` the
    name the client gave in HELO/EHLO, as given.
    """
    hd = helo_domain(helo)
    if mail_from:
        if hd is not None:
            mf, he = await asyncio.gather(
                checker.evaluate(client_ip, mail_from, hd),
                checker.evaluate(client_ip, "", hd),
            )
            auth.spf_helo = _result("helo", he, client_ip)
        else:
            # %{h} in a policy expands to the HELO as given, when it is plain.
            plain = helo if helo.isascii() and helo.isprintable() and " " not in helo else ""
            mf = await checker.evaluate(client_ip, mail_from, plain)
        auth.spf_mailfrom = _result("mailfrom", mf, client_ip)
        deciding, identity, label = mf, "sender", "MAIL FROM"
    else:
        if hd is not None:
            he = await checker.evaluate(client_ip, "", hd)
        else:
            he = SpfEvaluation("none", "", explanation="HELO is not a domain name")
        auth.spf_helo = _result("helo", he, client_ip)
        deciding, identity, label = he, "HELO name", "HELO (null sender)"

    res = deciding.result
    action = Action(policy.action_for(res))
    detail = (
        f"SPF {res} for {label} {shown(deciding.domain) or '-'} from {client_ip}: {_why(deciding)}"
    )
    if mail_from and auth.spf_helo is not None:
        detail += f"; HELO {shown(auth.spf_helo.domain)}: {auth.spf_helo.result}"
    v = Verdict(Layer.SPOOFING, action, f"spf.{res}", detail, _reply(action, deciding, identity))
    return v.in_shadow() if policy.mode == "shadow" and v.acts else v


def for_pipeline(
    checker: SpfChecker,
) -> Callable[[config.Spf, AuthResults, str, str, str], Awaitable[Verdict]]:
    """`check` bound to `checker`, in the positional shape of `pipeline.SpfLayer`:
    (policy, auth, client IP, HELO, MAIL FROM)."""

    async def layer(
        policy: config.Spf, auth: AuthResults, client_ip: str, helo: str, mail_from: str
    ) -> Verdict:
        return await check(
            checker, policy, auth, client_ip=client_ip, helo=helo, mail_from=mail_from
        )

    return layer
