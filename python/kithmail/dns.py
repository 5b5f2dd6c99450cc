"""One async DNS resolver for the whole process: A, AAAA, TXT and MX lookups.

Every layer that asks the DNS (SPF, DKIM, DMARC, DNSBLs, MX for delivery)
asks through one `Resolver` built from `[dns]`: the configured nameservers
only, never the system's resolv.conf, no search list, every name absolute.
Each lookup answers within the configured `timeout` with a `Result` whose
`status` says what happened — an answer, NXDOMAIN, no data, a timeout, a
server failure (SERVFAIL, REFUSED, unreachable), or a malformed name or
reply. A timeout or a failure is a result, never a hang and never an
exception (STYLE.md §5); only a bug raises.

Every query sent is counted in `kithmail_dns_queries_total{type,result}`
and timed in `kithmail_dns_query_seconds{type}` (`kithmail.metrics`).

Trusts nothing in an answer: what it returns is capped (`max_records`
records, `max_bytes` bytes of data), and a capped result says so.

Standards: RFC 1035 (DNS, TC bit and TCP retry), RFC 6891 (EDNS(0); a
1232-byte UDP payload, the 2020 DNS flag day value), RFC 7208 §3.3 (the
strings of one TXT record are joined with nothing between them), RFC 7505
(null MX).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX as MXRdata
from dns.rdtypes.ANY.TXT import TXT as TXTRdata
from dns.rdtypes.IN.A import A as ARdata
from dns.rdtypes.IN.AAAA import AAAA as AAAARdata

from kithmail import config, metrics

__all__ = ["MX", "Resolver", "Result", "Status", "parse_nameserver"]

# EDNS(0) payload we advertise: big enough that a DKIM key or an SPF record
# usually fits one UDP datagram, small enough never to fragment (DNS flag
# day 2020). Anything larger comes back truncated and is asked again over TCP.
EDNS_PAYLOAD = 1232

# What one lookup may hand back, whatever the server sends.
MAX_RECORDS = 64
MAX_BYTES = 16384

T = TypeVar("T")


class Status(enum.StrEnum):
    """How a lookup ended."""

    ANSWER = "answer"  # at least one record
    NXDOMAIN = "nxdomain"  # the name does not exist
    NODATA = "nodata"  # the name exists, but has no record of this type
    TIMEOUT = "timeout"  # no answer within the configured timeout
    FAILURE = "failure"  # SERVFAIL, REFUSED, or no server reachable
    MALFORMED = "malformed"  # a bad name asked, or a reply that does not parse


@dataclass(frozen=True, slots=True)
class Result(Generic[T]):
    """The outcome of one lookup: its status, the records, and why.

    `records` is empty unless `status` is ANSWER. `capped` is true when the
    answer held more than the resolver hands back; `detail` is for logs.
    """

    name: str
    rdtype: str
    status: Status
    records: tuple[T, ...] = ()
    detail: str = ""
    capped: bool = False

    @property
    def ok(self) -> bool:
        """An answer with records."""
        return self.status is Status.ANSWER

    @property
    def temporary(self) -> bool:
        """Asking again later may give another answer (timeout, failure)."""
        return self.status in (Status.TIMEOUT, Status.FAILURE)

    @property
    def definite(self) -> bool:
        """The DNS said something: an answer, NXDOMAIN or no data."""
        return self.status in (Status.ANSWER, Status.NXDOMAIN, Status.NODATA)


class MX(NamedTuple):
    """One MX record; `host` is "." for a null MX (RFC 7505)."""

    preference: int
    host: str


_HOSTPORT = re.compile(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([0-9.]+):(\d+)")


def parse_nameserver(spec: str) -> tuple[str, int]:
    """ "192.0.2.53", "192.0.2.53:5353", "2001:db8::53" or "[2001:db8::53]:5353"."""
    s = spec.strip()
    try:
        return str(ipaddress.ip_address(s)), 53
    except ValueError:
        pass
    m = _HOSTPORT.fullmatch(s)
    if not m:
        raise ValueError(f"invalid nameserver {spec!r} (want 'IP' or 'IP:PORT')")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"invalid nameserver {spec!r}: port out of range")
    return str(ipaddress.ip_address(host)), port


def _name_text(n: dns.name.Name) -> str:
    return "." if n == dns.name.root else n.to_text(omit_final_dot=True)


def _a(rd: dns.rdata.Rdata) -> tuple[str, int]:
    assert isinstance(rd, ARdata)
    return str(rd.address), 4


def _aaaa(rd: dns.rdata.Rdata) -> tuple[str, int]:
    assert isinstance(rd, AAAARdata)
    return str(rd.address), 16


def _txt(rd: dns.rdata.Rdata) -> tuple[str, int]:
    # RFC 7208 §3.3: the character-strings of one record are concatenated
    # with no spaces added. Bytes that are not UTF-8 are kept visible as
    # U+FFFD, so a consumer sees a broken record rather than a shorter one.
    assert isinstance(rd, TXTRdata)
    data = b"".join(rd.strings)
    return data.decode("utf-8", errors="replace"), len(data)


def _mx(rd: dns.rdata.Rdata) -> tuple[MX, int]:
    assert isinstance(rd, MXRdata)
    host = _name_text(rd.exchange)
    return MX(int(rd.preference), host), 2 + len(host)


@dataclass
class Resolver:
    """The process's one DNS client; cheap to share, safe across tasks.

    Build it with `Resolver.from_settings(settings.dns)`. `timeout` bounds
    each lookup as a whole (every server, every retry, the TCP fallback).
    """

    nameservers: Sequence[tuple[str, int]]
    timeout: float
    max_records: int = MAX_RECORDS
    max_bytes: int = MAX_BYTES
    _resolver: dns.asyncresolver.Resolver = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.nameservers:
            raise ValueError("the resolver needs at least one nameserver ([dns] nameservers)")
        if self.timeout <= 0:
            raise ValueError("the DNS timeout must be positive ([dns] timeout)")
        r = dns.asyncresolver.Resolver(configure=False)  # never /etc/resolv.conf
        r.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in self.nameservers]
        r.lifetime = self.timeout
        # Share the lifetime among the servers, so that one silent server
        # does not use up the whole of it before the next is asked.
        r.timeout = self.timeout / len(self.nameservers)
        r.use_edns(0, 0, EDNS_PAYLOAD)
        r.search = []
        r.use_search_by_default = False
        r.cache = None
        self._resolver = r

    @classmethod
    def from_settings(cls, dns_settings: config.Dns) -> Resolver:
        return cls(
            nameservers=[parse_nameserver(s) for s in dns_settings.nameservers],
            timeout=dns_settings.timeout,
        )

    async def a(self, name: str) -> Result[str]:
        """IPv4 addresses of `name`, as text."""
        return await self._lookup(name, dns.rdatatype.A, _a)

    async def aaaa(self, name: str) -> Result[str]:
        """IPv6 addresses of `name`, as text."""
        return await self._lookup(name, dns.rdatatype.AAAA, _aaaa)

    async def txt(self, name: str) -> Result[str]:
        """TXT records of `name`, each record's strings joined (RFC 7208 §3.3)."""
        return await self._lookup(name, dns.rdatatype.TXT, _txt)

    async def mx(self, name: str) -> Result[MX]:
        """MX records of `name`, lowest preference first."""
        r = await self._lookup(name, dns.rdatatype.MX, _mx)
        if not r.records:
            return r
        ordered = tuple(sorted(r.records, key=lambda m: (m.preference, m.host)))
        return Result(r.name, r.rdtype, r.status, ordered, r.detail, r.capped)

    async def _lookup(
        self,
        name: str,
        rdtype: dns.rdatatype.RdataType,
        convert: Callable[[dns.rdata.Rdata], tuple[T, int]],
    ) -> Result[T]:
        t0 = time.perf_counter()
        r = await self._ask(name, rdtype, convert)
        if r.status is not Status.MALFORMED or r.detail[:9] != "bad name:":  # nothing was sent
            metrics.dns_query(r.rdtype, r.status.value, time.perf_counter() - t0)
        return r

    async def _ask(
        self,
        name: str,
        rdtype: dns.rdatatype.RdataType,
        convert: Callable[[dns.rdata.Rdata], tuple[T, int]],
    ) -> Result[T]:
        kind = dns.rdatatype.to_text(rdtype)
        try:
            if not name.strip(". "):
                raise ValueError("empty name")
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError) as e:
            return Result(name, kind, Status.MALFORMED, detail=f"bad name: {e}")
        shown = _name_text(qname)

        def result(status: Status, detail: str) -> Result[T]:
            return Result(shown, kind, status, detail=detail)

        try:
            # dnspython keeps to its lifetime by itself; this outer deadline
            # is a second fence so that no bug of ours or its can hang a
            # session (it is never meant to be the one that fires).
            async with asyncio.timeout(self.timeout + 1.0):
                answer = await self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            return result(Status.NXDOMAIN, "no such name")
        except dns.resolver.NoAnswer:
            return result(Status.NODATA, f"no {kind} record")
        except (dns.exception.Timeout, TimeoutError):
            return result(Status.TIMEOUT, f"no answer within {self.timeout:g}s")
        except dns.resolver.NoNameservers as e:
            return result(*_why_no_nameservers(e))
        except dns.resolver.YXDOMAIN:
            return result(Status.MALFORMED, "name too long after DNAME substitution")
        except dns.exception.DNSException as e:
            return result(Status.MALFORMED, f"{type(e).__name__}: {e}")

        records: list[T] = []
        size = 0
        capped = False
        for rd in answer.rrset or ():
            if len(records) >= self.max_records:
                capped = True
                break
            value, n = convert(rd)
            if size + n > self.max_bytes:
                capped = True
                break
            records.append(value)
            size += n
        if not records and not capped:
            return result(Status.NODATA, f"no {kind} record")
        detail = f"capped at {len(records)} records, {size} bytes" if capped else ""
        return Result(shown, kind, Status.ANSWER, tuple(records), detail, capped)


def _why_no_nameservers(e: dns.resolver.NoNameservers) -> tuple[Status, str]:
    """Every server failed: say how (the last word of each server counts)."""
    errors = e.kwargs.get("errors") or []
    parts: list[str] = []
    malformed = bool(errors)
    for err in errors:
        server, cause = err[0], err[3]
        if isinstance(cause, str):  # an rcode: SERVFAIL, REFUSED, NOTIMP, ...
            parts.append(f"{server}: {cause}")
            malformed = False
        else:
            parts.append(f"{server}: {type(cause).__name__} {cause}".rstrip())
            if not isinstance(cause, dns.exception.FormError | dns.message.Truncated | EOFError):
                malformed = False
    detail = "; ".join(parts) or "no nameserver answered"
    return (Status.MALFORMED if malformed else Status.FAILURE), detail
