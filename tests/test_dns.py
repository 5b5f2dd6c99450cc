"""The one resolver (kithmail.dns) against a real dnsmasq and a silent socket.

Every outcome a layer must tell apart is produced by a real server: an
answer, NXDOMAIN, no data, REFUSED, a server that never answers, a name
that cannot be asked. TXT records longer than 255 bytes come back as
several character-strings and are joined exactly; answers over 512 bytes
(and over the 1232-byte EDNS payload, so truncated over UDP and asked again
over TCP) arrive whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import dns.message
import dns.query
import dns.rdatatype
import pytest
from dns.rdtypes.ANY.TXT import TXT as TXTRdata
from dns_server import Dnsmasq, SilentServer, StartDnsmasq

from kithmail import config
from kithmail.dns import MX, Resolver, Status, parse_nameserver

T = TypeVar("T")
TIMEOUT = 0.3

# The shape of a 2048-bit DKIM key record: 392 base64 characters of key.
DKIM_KEY = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" + "x7Kp" * 87
DKIM = f"v=DKIM1; k=rsa; p={DKIM_KEY}"
SPF = "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all"


def run(aw: Awaitable[T]) -> T:
    async def main() -> T:
        return await aw

    return asyncio.run(main())


@pytest.fixture
def zone(dnsmasq: StartDnsmasq) -> Dnsmasq:
    return dnsmasq(
        a=[("mail.example.test", "192.0.2.25")],
        aaaa=[("mail.example.test", "2001:db8::25")],
        txt=[
            ("example.test", SPF),
            ("sel._domainkey.example.test", DKIM),
            ("split.example.test", ["v=spf1 ", "ip4:192.0.2.1", " -all"]),
            # ~800 bytes: over 512, inside one EDNS datagram.
            *[("mid.example.test", f"{i:02d} " + "m" * 200) for i in range(4)],
            # ~3 kB: over 1232 too, so truncated over UDP and asked over TCP.
            *[("big.example.test", f"{i:02d} " + "b" * 240) for i in range(12)],
        ],
        mx=[("example.test", "mx2.example.test", 20), ("example.test", "mx1.example.test", 10)],
    )


def resolver_for(*servers: str, timeout: float = TIMEOUT) -> Resolver:
    s = config.from_mapping({"dns": {"nameservers": list(servers), "timeout": timeout}})
    return Resolver.from_settings(s.dns)


def test_nameservers_are_ip_or_ip_port() -> None:
    assert parse_nameserver("192.0.2.53") == ("192.0.2.53", 53)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("2001:db8::53") == ("2001:db8::53", 53)
    assert parse_nameserver("[2001:db8::53]:5353") == ("2001:db8::53", 5353)
    with pytest.raises(ValueError, match="nameserver"):
        parse_nameserver("ns.example.test")
    r = resolver_for("127.0.0.1:5353", "192.0.2.53")
    assert r.nameservers == [("127.0.0.1", 5353), ("192.0.2.53", 53)]


def test_a_aaaa_and_mx_answers(zone: Dnsmasq) -> None:
    r = resolver_for(zone.address)
    a = run(r.a("mail.example.test"))
    assert (a.status, a.records, a.ok) == (Status.ANSWER, ("192.0.2.25",), True)
    assert run(r.aaaa("mail.example.test")).records == ("2001:db8::25",)
    mx = run(r.mx("example.test"))
    assert mx.records == (MX(10, "mx1.example.test"), MX(20, "mx2.example.test"))
    # A name with a trailing dot is the same name.
    assert run(r.a("mail.example.test.")).records == ("192.0.2.25",)


def test_nxdomain_is_not_nodata(zone: Dnsmasq) -> None:
    r = resolver_for(zone.address)
    nx = run(r.a("nobody.example.test"))
    assert (nx.status, nx.records, nx.definite, nx.temporary) == (
        Status.NXDOMAIN,
        (),
        True,
        False,
    )
    nodata = run(r.txt("mail.example.test"))
    assert (nodata.status, nodata.records, nodata.definite) == (Status.NODATA, (), True)


def test_txt_strings_are_joined_exactly(zone: Dnsmasq) -> None:
    r = resolver_for(zone.address)
    assert run(r.txt("example.test")).records == (SPF,)
    # RFC 7208 §3.3: no space is added where the strings meet.
    assert run(r.txt("split.example.test")).records == ("v=spf1 ip4:192.0.2.1 -all",)


def test_dkim_sized_txt_is_split_on_the_wire_and_joined_whole(zone: Dnsmasq) -> None:
    # What the server really sends: more than one character-string.
    q = dns.message.make_query("sel._domainkey.example.test", "TXT")
    wire = dns.query.udp(q, "127.0.0.1", port=zone.port, timeout=2)
    [rd] = wire.answer[0]
    assert isinstance(rd, TXTRdata)
    assert len(rd.strings) == 2 and all(len(s) <= 255 for s in rd.strings)
    assert len(DKIM) > 255
    r = resolver_for(zone.address)
    assert run(r.txt("sel._domainkey.example.test")).records == (DKIM,)


def test_answers_over_512_bytes_arrive_whole(zone: Dnsmasq) -> None:
    r = resolver_for(zone.address)
    mid = run(r.txt("mid.example.test"))
    assert sorted(mid.records) == [f"{i:02d} " + "m" * 200 for i in range(4)]
    big = run(r.txt("big.example.test"))
    assert sorted(big.records) == [f"{i:02d} " + "b" * 240 for i in range(12)]
    assert not big.capped
    # The big one was asked twice: over UDP (truncated), then over TCP, which
    # dnsmasq serves from a forked child.
    asked = [pid for _, name, pid in zone.queries() if name == "big.example.test"]
    assert len(asked) == 2 and asked[0] != asked[1]


def test_what_is_returned_is_capped(zone: Dnsmasq) -> None:
    s = resolver_for(zone.address)
    r = Resolver(s.nameservers, TIMEOUT, max_records=5)
    big = run(r.txt("big.example.test"))
    assert (big.status, len(big.records), big.capped) == (Status.ANSWER, 5, True)
    r = Resolver(s.nameservers, TIMEOUT, max_bytes=600)
    big = run(r.txt("big.example.test"))
    assert (len(big.records), big.capped) == (2, True)
    assert "capped" in big.detail


def test_refused_is_a_failure_not_an_answer(zone: Dnsmasq) -> None:
    # dnsmasq refuses names outside its --local zones.
    res = run(resolver_for(zone.address).a("elsewhere.invalid"))
    assert (res.status, res.temporary, res.definite) == (Status.FAILURE, True, False)
    assert "REFUSED" in res.detail


def test_a_silent_server_is_a_timeout(silent: SilentServer) -> None:
    res = run(resolver_for(silent.address).a("mail.example.test"))
    assert (res.status, res.records, res.temporary) == (Status.TIMEOUT, (), True)
    assert "0.3s" in res.detail
    assert silent.received() >= 1


@pytest.mark.timeout(10)
def test_many_lookups_at_a_silent_server_all_end(silent: SilentServer) -> None:
    r = resolver_for(silent.address)

    async def many() -> list[Status]:
        rs = await asyncio.gather(*(r.txt(f"n{i}.example.test") for i in range(50)))
        return [x.status for x in rs]

    assert run(many()) == [Status.TIMEOUT] * 50


def test_a_silent_server_first_does_not_starve_the_next(
    zone: Dnsmasq, silent: SilentServer
) -> None:
    r = resolver_for(silent.address, zone.address, timeout=1.0)
    assert run(r.a("mail.example.test")).records == ("192.0.2.25",)


@pytest.mark.parametrize("name", ["bad..example.test", "x" * 64 + ".example.test", ""])
def test_a_name_that_cannot_be_asked_is_malformed(zone: Dnsmasq, name: str) -> None:
    res = run(resolver_for(zone.address).a(name))
    assert res.status is Status.MALFORMED
    assert zone.queries()[1:] == []  # only the readiness probe reached the server


def test_the_system_resolver_is_never_used(zone: Dnsmasq) -> None:
    # "localhost" resolves from /etc/hosts for the system; for us it is a
    # DNS name like any other, asked of the configured server only.
    res = run(resolver_for(zone.address).a("localhost"))
    assert res.status is Status.FAILURE
    assert [q[:2] for q in zone.queries()[1:]] == [("A", "localhost")]
