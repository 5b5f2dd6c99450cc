"""The Postfix policy protocol, spoken to the service directly over loopback.

Exact request/response pairs, then every malformed case: each gets an answer
or a closed connection with a log line, and other connections carry on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from dns_server import StartDnsmasq
from prometheus_client import CollectorRegistry

import kithmail
from kithmail import config
from kithmail.dns import Resolver
from kithmail.layers.recon import SpfAnswer
from kithmail.layers.reputation import Reputation
from kithmail.metrics import Metrics
from kithmail.smtp.policy import Limits, PolicyService
from kithmail.spf import SpfChecker


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def no_spf(ip: str, sender: str) -> SpfAnswer:
    return SpfAnswer("none")


def request(**attrs: str) -> bytes:
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "instance": "1"}
    return ("".join(f"{k}={v}\n" for k, v in {**base, **attrs}.items()) + "\n").encode()


async def answer(reader: asyncio.StreamReader) -> str:
    return (await reader.readuntil(b"\n\n")).decode()


@asynccontextmanager
async def service(
    tmp_path: Path,
    clock: Clock,
    limits: Limits | None = None,
    registry: CollectorRegistry | None = None,
    **cfg: object,
) -> AsyncIterator[tuple[PolicyService, int, kithmail.Core]]:
    registry = registry or CollectorRegistry()
    data = {
        "server": {"data_dir": str(tmp_path / "var")},
        "recon": {"min_delay": "60s", "retry_window": "1h"},
        "dns": {"nameservers": ["127.0.0.1:9"], "timeout": "250ms"},
        **cfg,
    }
    settings = config.from_mapping(data)
    core = kithmail.Core(str(tmp_path / "core"), min_delay=60, retry_window=3600)
    rep = Reputation.from_settings(core, settings, Resolver.from_settings(settings.dns))
    svc = PolicyService(
        settings, core, rep, no_spf, clock=clock, limits=limits, metrics=Metrics("policy", registry)
    )
    servers = await svc.start(["127.0.0.1:0"])
    port = servers[0].sockets[0].getsockname()[1]
    try:
        yield svc, port, core
    finally:
        for s in servers:
            s.close()
        core.close()


A = {"client_address": "198.51.100.7", "sender": "bob@example.org", "recipient": "ann@example.test"}


def test_greylisting_cycle_on_one_persistent_connection(tmp_path: Path) -> None:
    registry = CollectorRegistry()

    async def go() -> None:
        clock = Clock()
        async with service(tmp_path, clock, registry=registry) as (_, port, _core):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(request(**A))
            assert await answer(r) == (
                "action=DEFER_IF_PERMIT 4.7.1 Greylisted: this server is new to us, retry in 60 s\n\n"
            )
            clock.t += 61
            w.write(request(**A, instance="2"))
            assert await answer(r) == "action=PREPEND X-Kithmail-Recon: passed\n\n"
            # The same message's next recipient: the header is not added twice.
            w.write(request(**{**A, "recipient": "cy@example.test"}, instance="2"))
            assert await answer(r) == "action=DUNNO\n\n"
            # Other protocol states, and attributes Postfix may add one day.
            w.write(request(**A, protocol_state="DATA", some_future_attr="x"))
            assert await answer(r) == "action=DUNNO\n\n"
            w.close()
            await w.wait_closed()

    asyncio.run(go())
    sample = registry.get_sample_value
    labels = {"frontend": "policy", "layer": "recon", "shadow": "no"}
    assert sample("kithmail_verdicts_total", {**labels, "action": "defer"}) == 1
    assert sample("kithmail_verdicts_total", {**labels, "action": "accept"}) == 2
    assert sample("kithmail_policy_requests_total", {"result": "answered"}) == 4
    assert sample("kithmail_layer_seconds_count", {"frontend": "policy", "layer": "recon"}) == 3


def test_trusted_network_and_local_lists(tmp_path: Path) -> None:
    async def go() -> None:
        async with service(tmp_path, Clock()) as (_, port, core):
            core.reputation.load("drop", "block", ["203.0.113.0/24"], action="reject")
            core.reputation.load("friends", "allow", ["192.0.2.0/24"])
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(request(**{**A, "client_address": "127.0.0.1"}))
            assert await answer(r) == "action=DUNNO\n\n"
            w.write(request(**{**A, "client_address": "192.0.2.80"}))
            assert await answer(r) == "action=DUNNO\n\n", "allow list skips Recon too"
            assert core.recon.show("192.0.2.80") is None
            # A listed source is deferred by Recon first (it never retries, we never
            # spend a lookup); once it has passed Recon the block list rejects it.
            core.recon.exempt_add("203.0.113.0/24")
            w.write(request(**{**A, "client_address": "203.0.113.9"}))
            got = await answer(r)
            assert got.startswith("action=554 5.7.1 "), got
            w.close()
            await w.wait_closed()

    asyncio.run(go())


def test_only_policy_clients_may_connect(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        async with service(tmp_path, Clock(), policy={"policy_clients": ["127.0.0.2/32"]}) as (
            _,
            port,
            core,
        ):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(request(**A))
            try:
                got = await r.read()
            except ConnectionResetError:
                got = b""
            assert got == b"", "refused: closed without an answer"
            w.close()
            assert core.recon.show(A["client_address"]) is None, "nothing was marked"

    with caplog.at_level(logging.WARNING, "kithmail.policy"):
        asyncio.run(go())
    assert "not in policy_clients" in caplog.text


@pytest.mark.parametrize(
    ("payload", "logged"),
    [
        (b"no equals sign\n\n", "line without name=value"),
        (b"client_address=" + b"9" * 5000 + b"\n\n", "line longer than"),
        (b"".join(b"a%d=1\n" % i for i in range(200)) + b"\n", "more than 128 attributes"),
        (b"request=smtpd_access_policy\nclient_address=1.2.3.4\n", "not finished in time"),
    ],
)
def test_malformed_requests_close_with_a_log_line_and_others_carry_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, payload: bytes, logged: str
) -> None:
    async def go() -> None:
        limits = Limits(request_timeout=0.3)
        async with service(tmp_path, Clock(), limits) as (_, port, _core):
            good_r, good_w = await asyncio.open_connection("127.0.0.1", port)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(payload)
            try:
                got = await asyncio.wait_for(r.read(), 5)
            except ConnectionResetError:  # closed while our bytes were unread
                got = b""
            assert got == b""
            w.close()
            good_w.write(request(**A))
            assert (await answer(good_r)).startswith("action=DEFER_IF_PERMIT")
            good_w.close()
            await good_w.wait_closed()

    with caplog.at_level(logging.WARNING, "kithmail.policy"):
        asyncio.run(go())
    assert logged in caplog.text


def test_hundreds_of_persistent_connections(tmp_path: Path) -> None:
    async def go() -> None:
        async with service(tmp_path, Clock()) as (_, port, _core):
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(300)]
            for i, (_, w) in enumerate(conns):
                w.write(request(**{**A, "client_address": f"10.0.{i // 250}.{i % 250}"}))
            answers = await asyncio.gather(*(answer(r) for r, _ in conns))
            assert all(a.startswith("action=DEFER_IF_PERMIT 4.7.1") for a in answers)
            for _, w in conns:
                w.close()
            await asyncio.gather(*(w.wait_closed() for _, w in conns))

    asyncio.run(go())


def test_spf_where_configured(tmp_path: Path, dnsmasq: StartDnsmasq) -> None:
    zone = dnsmasq(
        zones=["example.org"],
        txt=[
            ("example.org", "v=spf1 ip4:192.0.2.0/24 -all"),
            ("soft.example.org", "v=spf1 ~all"),
        ],
    )

    async def go() -> None:
        settings = config.from_mapping(
            {
                "server": {"data_dir": str(tmp_path / "var")},
                "dns": {"nameservers": [zone.address], "timeout": "2s"},
                "policy": {"spf": True},
            }
        )
        core = kithmail.Core(str(tmp_path / "core"))
        core.recon.exempt_add("192.0.2.0/24")  # past Recon, to reach SPF
        core.recon.exempt_add("198.51.100.0/24")
        rep = Reputation.from_settings(core, settings, Resolver.from_settings(settings.dns))
        spf = SpfChecker(settings.dns.nameservers, settings.dns.timeout)
        svc = PolicyService(
            settings, core, rep, spf, metrics=Metrics("policy", CollectorRegistry())
        )
        servers = await svc.start(["127.0.0.1:0"])
        port = servers[0].sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port)

        async def ask(**attrs: str) -> str:
            w.write(request(**attrs))
            return await answer(r)

        base = {
            "client_address": "192.0.2.5",
            "sender": "bob@example.org",
            "recipient": "ann@x.test",
        }
        assert await ask(**base, helo_name="mail.example.org", instance="m1") == (
            "action=PREPEND Received-SPF: pass (kithmail) client-ip=192.0.2.5; "
            'envelope-from="bob@example.org"; helo=mail.example.org;\n\n'
        )
        # Once per message: the second recipient of m1 adds nothing.
        assert await ask(**base, instance="m1") == "action=DUNNO\n\n"
        # A client string that is not plain never reaches the header.
        got = await ask(**base, helo_name='evil"\tname', instance="m2")
        assert "helo=" not in got and "evil" not in got
        fail = await ask(**{**base, "client_address": "198.51.100.9"}, instance="m3")
        assert fail.startswith("action=550 5.7.23 SPF fail"), fail
        soft = await ask(**{**base, "sender": "x@soft.example.org"}, instance="m4")
        assert soft == "action=HOLD spf.softfail\n\n"
        w.close()
        await w.wait_closed()
        for s in servers:
            s.close()
        core.close()

    asyncio.run(go())


def test_a_slow_drip_does_not_push_the_request_deadline_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> float | None:
        async with service(tmp_path, Clock(), Limits(request_timeout=0.5)) as (_, port, _core):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            closed_at = None
            try:
                for byte in request(**A)[:-2]:  # all but the final empty line: ~6 s
                    w.write(bytes([byte]))
                    await w.drain()
                    await asyncio.sleep(0.05)
                    if r.at_eof() or r.exception() is not None:
                        closed_at = loop.time()
                        break
            except ConnectionError:
                closed_at = loop.time()
            w.close()
            return None if closed_at is None else closed_at - t0

    with caplog.at_level(logging.WARNING, "kithmail.policy"):
        took = asyncio.run(go())
    assert took is not None, "a drip of bytes kept the connection open"
    assert took < 3, "closed near the request deadline, not when the drip ended"
    assert "request not finished in time" in caplog.text
