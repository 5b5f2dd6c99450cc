"""SPF (RFC 7208) through pyspf, with every query sent to kithmail's nameservers.

pyspf evaluates the record; this module gives it a DNS lookup over
dnspython that asks only the `[dns] nameservers`, each query bounded by
`[dns] timeout` and the whole check by a budget — never the system
resolver — and reports what the layers need of an evaluation: the result,
the domain checked, and which network a pass came through (pool-aware
Recon retries want a pass through a mechanism narrower than /16 or /32,
never `all`). pyspf is synchronous, so each check runs in a thread.

The processing limits of RFC 7208 §4.6.4 are pinned here rather than
left to pyspf's defaults: at most 10 DNS-querying mechanisms and modifiers
(`include`, `a`, `mx`, `ptr`, `exists`, `redirect`), at most 10 MX and
PTR names looked at, at most 2 void lookups; going past any of them is
`permerror` (pyspf's strict mode, which raises where lax mode would go on).

Trusts nothing in DNS answers: pyspf parses and bounds them, and what this
module hands back is plain data. A timeout or a server failure is
`temperror`, a result, never a hang. Each query is counted with the
resolver's (`kithmail_dns_queries_total`, `kithmail.metrics.dns_query`).
Standards: RFC 7208 (SPF; §2.3 HELO, §2.4 MAIL FROM, §4.6.4 limits), RFC 1035.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import dns.exception
import dns.message
import dns.name
import dns.resolver
import spf as pyspf

from kithmail import metrics
from kithmail.dns import EDNS_PAYLOAD, parse_nameserver
from kithmail.layers.recon import SpfAnswer

__all__ = ["Result", "SpfChecker", "SpfEvaluation"]

Result = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
_RESULTS = {"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"}

# RFC 7208 §4.6.4. pyspf's own defaults are these today; pinning them means
# a future release cannot quietly relax what kithmail promises.
pyspf.MAX_LOOKUP = 10
pyspf.MAX_MX = 10
pyspf.MAX_PTR = 10
pyspf.MAX_VOID_LOOKUPS = 2

# The whole of one check, however many lookups it makes. RFC 7208 §4.6.4
# asks that at least 20 s be allowed before giving up on a check.
DEFAULT_BUDGET = 20.0

# pyspf looks its DNS function up as a module global at each query; ours
# asks the resolver of the check running in this thread (a context variable
# that asyncio.to_thread carries over), so checkers with different
# nameservers can live in one process.
_resolver: contextvars.ContextVar[dns.resolver.Resolver] = contextvars.ContextVar("spf_resolver")


def _host(name: dns.name.Name) -> str:
    # The root (a null MX, "MX 0 .") becomes "", which pyspf skips; its
    # text "." would be a query pyspf refuses with a bare Exception.
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True)


def _cname_loop(e: dns.resolver.NoNameservers) -> bool:
    """Every server answered with a CNAME loop (or a chain past dnspython's limit).

    That is the zone's lasting state, not a passing failure: the name is
    taken as one that does not exist (a void lookup), as pyspf treats the
    loops it follows itself, and as RFC 7208 §5.5 wants a PTR name whose
    A lookup fails skipped rather than the whole check failed.
    """
    errors = e.kwargs.get("errors") or []
    return bool(errors) and all(isinstance(err[3], dns.message.ChainTooLong) for err in errors)


def _lookup(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> list[Any]:
    """pyspf's DNSLookup: [((name, type), value)] for the records of `name`.

    CNAMEs are followed by dnspython, and the records are reported under
    the name asked, which is the key pyspf caches them by.
    """
    resolver = _resolver.get()
    out: list[Any] = []
    t0 = time.perf_counter()

    def counted(result: str) -> None:
        metrics.dns_query(qtype, result, time.perf_counter() - t0)

    try:
        answer = resolver.resolve(
            name,
            qtype,
            lifetime=max(0.001, min(timeout, resolver.lifetime)),
            raise_on_no_answer=False,
            search=False,
        )
    except dns.resolver.NXDOMAIN:
        counted("nxdomain")
        return out
    except dns.exception.Timeout:
        counted("timeout")
        raise pyspf.TempError(f"DNS timeout asking {qtype} {name}") from None
    except dns.resolver.NoNameservers as e:
        if _cname_loop(e):
            counted("malformed")
            return out
        counted("failure")
        raise pyspf.TempError(f"DNS server failure asking {qtype} {name}") from None
    except dns.exception.DNSException as e:
        counted("malformed")
        raise pyspf.TempError(f"DNS {type(e).__name__} asking {qtype} {name}") from None
    if answer.rrset is None:
        counted("nodata")
        return out
    counted("answer")
    for rdata in answer.rrset:
        r = cast(Any, rdata)
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), r.address))
        elif qtype == "MX":
            out.append(((name, qtype), (r.preference, _host(r.exchange))))
        elif qtype == "PTR":
            out.append(((name, qtype), _host(r.target)))
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


@dataclass(frozen=True, slots=True)
class SpfEvaluation:
    """One check_host() (RFC 7208 §4) and what decided it.

    `domain` is the domain whose policy was evaluated (the MAIL FROM's
    domain, or the HELO name for the HELO identity and the null sender).
    `network` and `all` are as in `SpfAnswer`. `mechanism` is the term that
    matched at the top level ("" when none did); `explanation` is pyspf's
    text: the domain's `exp=` text or the default for fail, the problem for
    an error. Both come from DNS and the client: escape them before showing.
    """

    result: Result
    domain: str
    network: int | None = None
    all: bool = False
    mechanism: str = ""
    explanation: str = ""

    def answer(self) -> SpfAnswer:
        return SpfAnswer(self.result, self.network, self.all)


class SpfChecker:
    """SPF checks over `nameservers` ("IP" or "IP:PORT"), `timeout` seconds a query.

    `budget` bounds a whole check (RFC 7208 §4.6.4); a check that runs out
    of it is `temperror`.
    """

    def __init__(
        self, nameservers: Sequence[str], timeout: float, *, budget: float = DEFAULT_BUDGET
    ) -> None:
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
        r.use_edns(0, 0, EDNS_PAYLOAD)
        self._resolver = r
        self.timeout = timeout
        self.budget = max(budget, timeout)

    def evaluate_sync(self, ip: str, sender: str, helo: str = "") -> SpfEvaluation:
        """check_host() for mail from `sender` at `ip` (blocking).

        An empty `sender` checks the HELO identity, `postmaster@<helo>`
        (RFC 7208 §2.3, and §2.4 for the null sender).
        """
        if not sender and not helo:
            return SpfEvaluation("none", "", explanation="no identity to check")
        _resolver.set(self._resolver)
        try:
            # pyspf expands %{h} from `h`; "unknown" stands in for a missing HELO.
            q = _Query(
                i=ip, s=sender, h=helo or "unknown", timeout=self.timeout, querytime=self.budget
            )
        except pyspf.PermError as e:  # a client IP pyspf cannot parse
            return SpfEvaluation("permerror", "", explanation=str(e))
        # querytime sets both the remaining budget and pyspf's per-query
        # timeout; the resolver's own lifetime keeps each query to [dns] timeout.
        result, _code, text = q.check()
        res = cast(Result, result if result in _RESULTS else "permerror")
        mech = str(q.mechanism or "")
        matched_all = mech.lstrip("+?~-").lower() == "all"
        network = q.matched_len if res == "pass" and not matched_all else None
        domain = str(q.o or "")
        return SpfEvaluation(res, domain, network, matched_all, mech, str(text or ""))

    def check_sync(self, ip: str, sender: str, helo: str = "") -> SpfAnswer:
        """The SPF answer for mail from `sender` (or the HELO name when empty) at `ip`."""
        return self.evaluate_sync(ip, sender, helo).answer()

    async def evaluate(self, ip: str, sender: str, helo: str = "") -> SpfEvaluation:
        """As `evaluate_sync`, in a thread (pyspf blocks on DNS)."""
        return await asyncio.to_thread(self.evaluate_sync, ip, sender, helo)

    async def __call__(self, ip: str, sender: str) -> SpfAnswer:
        """As `check_sync`, in a thread: the `SpfCheck` Recon calls."""
        return await asyncio.to_thread(self.check_sync, ip, sender)
