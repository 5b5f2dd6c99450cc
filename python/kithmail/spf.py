"""SPF (RFC 7208) through pyspf, with every query sent to kithmail's nameservers.

pyspf evaluates the record (its DNS lookup limits of RFC 7208 §4.6.4
included); this module gives it a DNS lookup over dnspython that asks only
the `[dns] nameservers` with the configured timeout — never the system
resolver — and reports which network a pass came through, which pool-aware
Recon retries need (a pass through a mechanism narrower than /16 or /32,
never `all`). pyspf is synchronous, so each check runs in a thread.

Trusts nothing in DNS answers: pyspf parses and bounds them; a timeout or
server failure is `temperror`, a result, never a hang.
Standards: RFC 7208 (SPF), RFC 1035.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence
from typing import Any, Literal, cast

import dns.exception
import dns.resolver
import spf as pyspf

from kithmail.dns import parse_nameserver
from kithmail.layers.recon import SpfAnswer

__all__ = ["SpfChecker"]

Result = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
_RESULTS = {"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"}

# pyspf looks its DNS function up as a module global at each query; ours
# asks the resolver of the check running in this thread (a context variable
# that asyncio.to_thread carries over), so checkers with different
# nameservers can live in one process.
_resolver: contextvars.ContextVar[dns.resolver.Resolver] = contextvars.ContextVar("spf_resolver")


def _lookup(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> list[Any]:
    resolver = _resolver.get()
    out: list[Any] = []
    try:
        answer = resolver.resolve(name, qtype, lifetime=timeout, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return out
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
        raise pyspf.TempError(f"DNS {e}") from None
    except dns.exception.DNSException as e:
        raise pyspf.TempError(f"DNS {type(e).__name__}") from None
    if answer.rrset is None:
        return out
    for rdata in answer.rrset:
        r = cast(Any, rdata)
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), r.address))
        elif qtype == "MX":
            out.append(((name, qtype), (r.preference, r.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), r.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), r.strings))
    return out


pyspf.DNSLookup = _lookup


class _Query(pyspf.query):  # type: ignore[misc]
    """pyspf's query, remembering the CIDR length of the address match.

    A `cidrmatch` that returns True always decides the match at its level
    (ip4, ip6, a, mx), also inside an include, so the last one is the
    network the pass came through.
    """

    matched_len: int | None = None

    def cidrmatch(self, ipaddrs: Any, n: int) -> bool:
        ok = bool(super().cidrmatch(ipaddrs, n))
        if ok:
            self.matched_len = n
        return ok


class SpfChecker:
    """SPF checks over `nameservers` ("IP" or "IP:PORT"), `timeout` seconds each."""

    def __init__(self, nameservers: Sequence[str], timeout: float) -> None:
        r = dns.resolver.Resolver(configure=False)
        ips: list[str] = []
        port = 53
        for ns in nameservers:
            host, p = parse_nameserver(ns)
            ips.append(host)
            port = p  # dnspython has one port per resolver; the config uses one
        r.nameservers = ips
        r.port = port
        r.timeout = timeout
        r.lifetime = timeout
        self._resolver = r
        self.timeout = timeout

    def check_sync(self, ip: str, sender: str, helo: str = "") -> SpfAnswer:
        """The SPF answer for mail from `sender` (or the HELO name when empty) at `ip`."""
        _resolver.set(self._resolver)
        q = _Query(i=ip, s=sender, h=helo or "unknown", timeout=self.timeout, querytime=0)
        result, _code, _text = q.check()
        res = result if result in _RESULTS else "permerror"
        mech = str(q.mechanism or "")
        matched_all = mech.lstrip("+?~-").lower() == "all"
        network = q.matched_len if res == "pass" and not matched_all else None
        return SpfAnswer(cast(Result, res), network, matched_all)

    async def __call__(self, ip: str, sender: str) -> SpfAnswer:
        """As `check_sync`, in a thread (pyspf blocks on DNS)."""
        return await asyncio.to_thread(self.check_sync, ip, sender)
