"""SIGHUP: `kith serve -c FILE` re-reads FILE in every worker, without a restart.

What an operator checks: after editing the file and sending SIGHUP, the
next command on an SMTP session that stayed open is answered by the new
settings (an SPF softfail, served by a real dnsmasq, refused instead of
held); a change of listener is logged as needing a restart and the old
port goes on serving; a file that does not validate keeps the old
settings and the log names the file and the key; with two workers both
reload; with no file there is nothing to re-read and the server says so
and goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from dns_server import Dnsmasq, StartDnsmasq
from gateway import Client, Gateway, free_port, run, running_gateway

from kithmail import config
from kithmail.reload import reload_once

OUTSIDE = "127.0.0.70"
SOFT = ("soft.test", "v=spf1 ip4:192.0.2.0/24 ~all")  # 127.0.0.70 is not in it: softfail
APPLIED = re.compile(r"reload: the settings of \S+ are in force \(pid (\d+)\)")


@pytest.fixture
def zones(dnsmasq: StartDnsmasq) -> Dnsmasq:
    return dnsmasq(zones=("soft.test",), txt=[SOFT])


def _sections(zones: Dnsmasq, **server: object) -> dict[str, dict[str, object]]:
    return {
        "server": dict(server),
        "dns": {"nameservers": [zones.address], "timeout": "1s"},
        "recon": {"exempt_networks": ["127.0.0.0/24"]},
        "spf": {"softfail": "quarantine"},
    }


@pytest.fixture
def gw(tmp_path: Path, zones: Dnsmasq) -> Iterator[Gateway]:
    with running_gateway(tmp_path / "gw", sections=_sections(zones)) as g:
        yield g


def _edit(gw: Gateway, old: str, new: str) -> None:
    text = gw.config.read_text()
    assert text.count(old) == 1, (old, text)
    gw.config.write_text(text.replace(old, new))


def _hup(gw: Gateway) -> None:
    assert gw.proc is not None
    os.kill(gw.proc.pid, signal.SIGHUP)


def _applied(gw: Gateway) -> list[str]:
    return APPLIED.findall(gw.log_text())


async def _rcpt(c: Client, sender: str, rcpt: str) -> str:
    await c.cmd(f"MAIL FROM:<{sender}>")
    reply = str(await c.cmd(f"RCPT TO:<{rcpt}>"))
    await c.cmd("RSET")
    return reply


def test_sighup_applies_the_file_to_a_session_that_stays_open(gw: Gateway) -> None:
    async def go() -> None:
        c, greeting = await Client.connect(gw.port, OUTSIDE)
        assert greeting is not None and greeting.code == 220
        assert (await c.cmd("EHLO client.example")).code == 250
        before = await _rcpt(c, "y@soft.test", "ann@example.test")
        assert before.startswith("250"), before  # softfail: quarantine, accepted at RCPT

        _edit(gw, 'softfail = "quarantine"', 'softfail = "reject"')
        _edit(gw, f"127.0.0.1:{gw.port}", f"127.0.0.1:{free_port()}")
        _hup(gw)
        await asyncio.to_thread(gw.wait_for, "the reload", lambda: _applied(gw))

        after = await _rcpt(c, "y@soft.test", "ann@example.test")
        assert after.startswith("550 5.7.23 SPF softfail"), after
        await c.cmd("QUIT")
        await c.close()

    run(go())
    assert gw.proc is not None and gw.proc.poll() is None
    log = gw.log_text()
    assert "reload: server.listeners changed in" in log and "needs a restart" in log

    # The old port still serves: the listeners were not touched.
    async def greet() -> int:
        c, greeting = await Client.connect(gw.port, OUTSIDE)
        await c.close()
        return greeting.code if greeting is not None else 0

    assert run(greet()) == 220


def test_sighup_with_an_invalid_file_keeps_the_old_settings_and_says_why(gw: Gateway) -> None:
    _edit(gw, 'softfail = "quarantine"', 'softfail = "bounce"')
    _hup(gw)
    line = gw.wait_for(
        "the refusal in the log",
        lambda: next((x for x in gw.log_text().splitlines() if "reload refused" in x), None),
    )
    assert str(gw.config) in line and "`spf.softfail`" in line, line
    assert _applied(gw) == []

    async def probe() -> str:
        c, _ = await Client.connect(gw.port, OUTSIDE)
        try:
            await c.cmd("EHLO client.example")
            return await _rcpt(c, "y@soft.test", "ann@example.test")
        finally:
            await c.close()

    assert run(probe()).startswith("250")  # still the old softfail = quarantine
    assert gw.proc is not None and gw.proc.poll() is None
    # Fixed and signalled again: now it applies.
    _edit(gw, 'softfail = "bounce"', 'softfail = "reject"')
    _hup(gw)
    gw.wait_for("the reload", lambda: _applied(gw))
    assert run(probe()).startswith("550 5.7.23")


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # self-signed: the names are what is checked
    return ctx


async def _greeting_and_cert(port: int) -> tuple[str, list[str]]:
    """The greeting, and the DNS names of the certificate STARTTLS presents."""
    c, greeting = await Client.connect(port, OUTSIDE)
    try:
        assert greeting is not None
        await c.cmd("EHLO client.example")
        assert (await c.cmd("STARTTLS")).code == 220
        await c.writer.start_tls(_client_tls())
        der = c.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        await c.cmd("QUIT")
        return greeting.text, list(san.value.get_values_for_type(x509.DNSName))
    finally:
        await c.close()


def test_sighup_reloads_the_certificate_and_the_hostname(gw: Gateway) -> None:
    greeting, names = run(_greeting_and_cert(gw.port))
    assert greeting.startswith("mx.kithmail.test") and names == ["mx.kithmail.test"]
    _edit(gw, 'hostname = "mx.kithmail.test"', 'hostname = "mx2.kithmail.test"')
    _hup(gw)
    gw.wait_for("the reload", lambda: _applied(gw))
    greeting, names = run(_greeting_and_cert(gw.port))
    assert greeting.startswith("mx2.kithmail.test") and names == ["mx2.kithmail.test"]


def test_sighup_reloads_the_local_lists(tmp_path: Path, zones: Dnsmasq) -> None:
    listed = tmp_path / "blocked.txt"
    listed.write_text("192.0.2.0/24\n")
    sections = _sections(zones)
    sections["reputation"] = {
        "local_lists": [{"name": "blocked", "path": listed, "kind": "block", "action": "reject"}]
    }

    async def probe(port: int) -> str:
        c, _ = await Client.connect(port, OUTSIDE)
        try:
            await c.cmd("EHLO client.example")
            return await _rcpt(c, "x@example.org", "ann@example.test")
        finally:
            await c.close()

    with running_gateway(tmp_path / "gw", sections=sections) as gw:
        assert run(probe(gw.port)).startswith("250")
        listed.write_text("192.0.2.0/24\n127.0.0.70/32\n")
        _hup(gw)
        gw.wait_for("the reload", lambda: _applied(gw))
        assert f"reputation list blocked loaded from {listed}: 2 prefixes" in gw.log_text()
        refused = run(probe(gw.port))
        assert refused.startswith("554 5.7.1"), refused


def _two(pids: list[str]) -> set[str] | None:
    return set(pids) if len(set(pids)) == 2 else None


def test_sighup_reaches_every_worker(tmp_path: Path, zones: Dnsmasq) -> None:
    with running_gateway(tmp_path / "gw", sections=_sections(zones, workers=2)) as gw:
        ready = gw.wait_for(
            "both workers ready",
            lambda: _two(re.findall(r"kithmail ready \(pid (\d+)\)", gw.log_text())),
        )
        _edit(gw, 'softfail = "quarantine"', 'softfail = "reject"')
        _hup(gw)
        reloaded = gw.wait_for("both workers reloaded", lambda: _two(_applied(gw)))
        assert reloaded == ready
        assert gw.proc is not None and gw.proc.poll() is None


def test_sighup_without_a_file_rereads_nothing_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    applied: list[config.Settings] = []

    async def apply(s: config.Settings) -> None:
        applied.append(s)

    with caplog.at_level(logging.WARNING, logger="kithmail.reload"):
        assert asyncio.run(reload_once(config.Settings, apply)) is False
    assert applied == []
    assert "nothing to re-read" in caplog.text


def test_sighup_moves_the_public_pages_to_a_new_public_url(gw: Gateway) -> None:
    """The confirmation pages take `public_url` from the settings in force:
    after a reload that moves it behind https://confirm.example.test, a
    form POSTed from that origin is judged on its token (here a made-up one:
    the "link not valid" page), and one from the old origin is refused as
    cross-site."""
    import requests

    old = f"http://127.0.0.1:{gw.public_port}"
    new = "https://confirm.example.test"

    def post(origin: str) -> requests.Response:
        return requests.post(
            f"{old}/sav/not-a-token",
            data={"form": "x"},
            headers={"Origin": origin},
            timeout=10,
        )

    assert post(old).status_code != 403
    assert post(new).status_code == 403
    _edit(gw, f'public_url = "{old}"', f'public_url = "{new}/"')
    _hup(gw)
    gw.wait_for("the reload", lambda: _applied(gw))
    assert post(new).status_code != 403
    assert post(old).status_code == 403
