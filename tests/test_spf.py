"""SPF through pyspf, every query to a real dnsmasq on loopback.

Checks the results kithmail acts on and the network a pass came through,
which pool-aware Recon retries need (through includes, and never `all`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from dns_server import Dnsmasq, SilentServer, StartDnsmasq

import kithmail
from kithmail.config import Recon as ReconPolicy
from kithmail.layers import recon
from kithmail.spf import SpfChecker

RECORDS = [
    ("example.test", "v=spf1 ip4:192.0.2.0/24 -all"),
    ("soft.example.test", "v=spf1 ~all"),
    ("pool.example.test", "v=spf1 include:_spf.pool.example.test -all"),
    ("_spf.pool.example.test", "v=spf1 ip4:198.51.100.0/24 ip6:2001:db8:5::/48 ~all"),
    ("wide.example.test", "v=spf1 ip4:10.0.0.0/8 -all"),
    ("open.example.test", "v=spf1 +all"),
    ("host.example.test", "v=spf1 a/24 -all"),
    ("bad.example.test", "v=spf1 ip4:999.1.1.1 -all"),
]


@pytest.fixture
def dns(dnsmasq: StartDnsmasq) -> Dnsmasq:
    return dnsmasq(zones=["example.test"], txt=RECORDS, a=[("host.example.test", "203.0.113.10")])


@pytest.mark.parametrize(
    ("ip", "sender", "result", "network", "all_"),
    [
        ("192.0.2.5", "ann@example.test", "pass", 24, False),
        ("198.51.100.1", "ann@example.test", "fail", None, True),
        ("198.51.100.1", "x@soft.example.test", "softfail", None, True),
        ("198.51.100.9", "alerts@pool.example.test", "pass", 24, False),
        ("2001:db8:5::25", "alerts@pool.example.test", "pass", 48, False),
        ("192.0.2.9", "alerts@pool.example.test", "fail", None, True),
        ("10.9.8.7", "x@wide.example.test", "pass", 8, False),
        ("192.0.2.1", "x@open.example.test", "pass", None, True),
        ("203.0.113.77", "x@host.example.test", "pass", 24, False),
        ("192.0.2.1", "x@none.example.test", "none", None, False),
        ("192.0.2.1", "x@bad.example.test", "permerror", None, False),
    ],
)
def test_results_and_the_network_of_a_pass(
    dns: Dnsmasq, ip: str, sender: str, result: str, network: int | None, all_: bool
) -> None:
    checker = SpfChecker([dns.address], timeout=2.0)
    a = asyncio.run(checker(ip, sender))
    assert (a.result, a.network, a.all) == (result, network, all_)
    assert all(name.endswith("example.test") for _, name, _ in dns.queries())


def test_a_silent_nameserver_is_temperror_not_a_hang(silent: SilentServer) -> None:
    checker = SpfChecker([silent.address], timeout=0.3)
    a = asyncio.run(checker("192.0.2.5", "ann@example.test"))
    assert a.result == "temperror"
    assert silent.received() >= 1, "the query went to the configured server only"


def test_a_pool_retry_passes_recon_with_real_spf(dns: Dnsmasq, tmp_path: Path) -> None:
    """Gmail-style: deferred from one pool server, retried from another."""
    core = kithmail.Core(str(tmp_path / "core"), min_delay=60, retry_window=3600)
    policy = ReconPolicy.model_validate({"min_delay": "60s", "retry_window": "1h"})
    checker = SpfChecker([dns.address], timeout=2.0)

    def rcpt(ip: str, now: int, sender: str) -> recon.Verdict:
        return asyncio.run(
            recon.check(
                core,
                policy,
                [],
                client_ip=ip,
                mail_from=sender,
                recipient="ann@example.test",
                now=now,
                spf=checker,
            )
        )

    assert rcpt("198.51.100.9", 1000, "alerts@pool.example.test").reason == "recon.new_source"
    asked = [name for _, name, _ in dns.queries() if not name.startswith("ready.")]
    assert asked == [], "a never-seen source costs no DNS query"
    assert rcpt("198.51.100.77", 1061, "alerts@pool.example.test").reason == "recon.pool_retry"
    # A domain whose SPF passes only through a /8 gets no such shortcut.
    assert rcpt("10.1.1.1", 1000, "x@wide.example.test").reason == "recon.new_source"
    assert rcpt("10.2.2.2", 1061, "x@wide.example.test").reason == "recon.new_source"
