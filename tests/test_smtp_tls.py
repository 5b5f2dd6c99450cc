"""STARTTLS at the inbound listener (RFC 3207), against the real server.

Advertised to every client; a real handshake with aiosmtplib is followed
by a delivered transaction whose Received header says ESMTPS and names
the TLS version; the session starts over after the handshake (§4.2); and
commands pipelined in plaintext behind STARTTLS are discarded, never run
inside the TLS session (the STARTTLS command injection class,
CVE-2011-0411). The certificate is the self-signed one `kith serve` made
under data_dir/tls. Recon exempts 127.0.0.0/24: these tests are not about
Recon.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import aiosmtplib
import pytest
from gateway import Gateway, Reply, message, run, smtp_quit
from smtp_fixtures import (
    RECON_EXEMPT,
    log_lines,
    module_gateway,
    quit_,
    session,
    settle,
    wait_messages,
    wait_no_sessions,
)

USERS = ("ann@example.test", "bob@example.test", "carol@example.test")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with module_gateway(tmp_path_factory, "tls", users=USERS, sections=RECON_EXEMPT) as g:
        yield g


def pair(r: Reply) -> tuple[int, str]:
    return (r.code, r.status)


def _client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the gateway's certificate is self-signed
    return ctx


def test_the_self_signed_certificate_is_made_under_data_dir(gw: Gateway) -> None:
    tls_dir = gw.data_dir / "tls"
    assert (tls_dir / "cert.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert (tls_dir / "key.pem").stat().st_mode & 0o077 == 0, "the key is readable by others"


def test_starttls_is_advertised_to_outsiders_and_trusted_clients(gw: Gateway) -> None:
    async def go(source: str) -> Reply:
        c, ehlo = await session(gw.port, source)
        await quit_(c)
        return ehlo

    for source in ("127.0.0.40", "127.0.0.1"):
        assert "STARTTLS" in run(go(source)).lines


def test_a_transaction_over_tls_is_delivered_with_esmtps_in_received(gw: Gateway) -> None:
    async def go() -> tuple[str, tuple[int, str]]:
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=gw.port,
            source_address=("127.0.0.41", 0),
            start_tls=False,
            validate_certs=False,
            timeout=20,
        )
        await smtp.connect()
        try:
            await smtp.ehlo(hostname="tls.client.example")
            assert smtp.supports_extension("starttls")
            r = await smtp.starttls()
            assert r.code == 220, r
            ssl_object = smtp.transport.get_extra_info("ssl_object") if smtp.transport else None
            assert ssl_object is not None
            version = str(ssl_object.version())
            await smtp.ehlo(hostname="tls.client.example")
            # Offered once: not again inside TLS.
            assert not smtp.supports_extension("starttls")
            again = await smtp.execute_command(b"STARTTLS")
            errors, reply = await smtp.sendmail(
                "bob@remote.test", ["ann@example.test"], message("over tls")
            )
            assert errors == {}, errors
            assert reply.startswith("2.0.0 Ok: queued as"), reply
            return version, (again.code, again.message.split(" ", 1)[0])
        finally:
            await smtp_quit(smtp)

    version, again = run(go())
    assert again == (503, "5.5.1"), again
    (got,) = wait_messages(gw, "ann@example.test", 1)
    head = got.split(b"\n\n", 1)[0]
    assert b"Received: from tls.client.example ([127.0.0.41])" in head
    assert f"(kithmail)\n\t({version}:".encode() in head, head
    assert b"with ESMTPS id" in head, head


def test_plaintext_commands_pipelined_behind_starttls_are_discarded(gw: Gateway) -> None:
    """RFC 3207 §4.2: the client must forget what it heard before the
    handshake, and so must the server: a MAIL and RCPT sent in the same
    packet as STARTTLS (by an attacker in the path, in the CVE-2011-0411
    class) must not open a transaction inside the TLS session."""

    async def go() -> list[Reply]:
        c, _ = await session(gw.port, "127.0.0.42")
        try:
            await c.send(
                b"STARTTLS\r\nMAIL FROM:<mallory@remote.test>\r\n"
                b"RCPT TO:<carol@example.test>\r\nDATA\r\n"
            )
            ready = await c.reply()
            assert pair(ready) == (220, "2.0.0"), ready
            await c.writer.start_tls(_client_context(), server_hostname="mx.kithmail.test")
            # The first reply inside TLS is the EHLO's: nothing injected was answered.
            ehlo = await c.cmd("EHLO tls.client.example")
            assert ehlo.lines[0] == "mx.kithmail.test", ehlo
            return [ehlo, await c.cmd("RCPT TO:<carol@example.test>"), await c.cmd("DATA")]
        finally:
            await quit_(c)

    ehlo, rcpt, data = run(go())
    assert "STARTTLS" not in ehlo.lines
    assert pair(rcpt) == (503, "5.5.1"), rcpt
    assert pair(data) == (503, "5.5.1"), data
    assert settle(gw, "carol@example.test", gw.port, "127.0.0.43") == []


def test_the_session_starts_over_after_starttls(gw: Gateway) -> None:
    """RFC 3207 §4.2: EHLO again, and a transaction opened before is gone."""

    async def go() -> list[Reply]:
        c, _ = await session(gw.port, "127.0.0.44")
        try:
            assert pair(await c.cmd("MAIL FROM:<bob@remote.test>")) == (250, "2.1.0")
            ready = await c.cmd("STARTTLS")
            assert (ready.code, ready.status) == (220, "2.0.0"), ready
            await c.writer.start_tls(_client_context(), server_hostname="mx.kithmail.test")
            out = [await c.cmd("MAIL FROM:<bob@remote.test>")]  # no EHLO yet inside TLS
            assert (await c.cmd("EHLO tls.client.example")).code == 250
            out.append(await c.cmd("RCPT TO:<bob@example.test>"))  # the old MAIL is gone
            out.append(await c.cmd("MAIL FROM:<bob@remote.test>"))
            return out
        finally:
            await quit_(c)

    before_ehlo, rcpt, mail = run(go())
    assert pair(before_ehlo) == (503, "5.5.1"), before_ehlo
    assert pair(rcpt) == (503, "5.5.1"), rcpt
    assert pair(mail) == (250, "2.1.0"), mail


def test_starttls_with_an_argument_is_501(gw: Gateway) -> None:
    async def go() -> tuple[Reply, Reply]:
        c, _ = await session(gw.port, "127.0.0.45")
        try:
            return await c.cmd("STARTTLS now"), await c.cmd("NOOP")
        finally:
            await quit_(c)

    bad, noop = run(go())
    assert pair(bad) == (501, "5.5.4"), bad
    assert pair(noop) == (250, "2.0.0"), noop


def test_a_failed_handshake_ends_only_that_session(gw: Gateway) -> None:
    """The SSL layer reports a failed handshake to no protocol: the session
    must still end, uncounted, and say why in one log line."""

    async def go() -> None:
        c, _ = await session(gw.port, "127.0.0.46")
        assert (await c.cmd("STARTTLS")).code == 220
        await c.send(b"this is not a TLS ClientHello\r\n" * 4)
        assert await c.closed()
        await c.close()
        # The server is fine.
        c, _ = await session(gw.port, "127.0.0.47")
        assert pair(await c.cmd("NOOP")) == (250, "2.0.0")
        await quit_(c)

    run(go())
    wait_no_sessions(gw)
    assert len(log_lines(gw, "client=127.0.0.46", "TLS handshake failed")) == 1
    assert "Traceback" not in gw.log_text()
