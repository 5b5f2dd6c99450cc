"""Layer 4 (kithmail.layers.antivirus) against a real clamd on loopback.

clamd is Debian's, started by `clamd_server` with the tests' own
signatures (EICAR by content, a file of ours by MD5, a daily database of
ours for VERSION's date); every message is built here, attachments and
zips included, and goes to clamd whole, as the SMTP listener received it.

Two peers are not clamd: a server that accepts and never answers, and one
that answers garbage (or a hostile signature name). Those are faults a
real clamd cannot be made to produce on demand; they are small asyncio
servers below, and they also count connections, which is how the
oversize test proves nothing was sent.
"""

from __future__ import annotations

import asyncio
import base64
import email.message
import email.policy
import io
import logging
import struct
import time
import zipfile
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from clamd_server import (
    DAILY_NAME,
    DAILY_STRING,
    DAILY_VERSION,
    EICAR,
    EICAR_NAME,
    MAX_RECURSION,
    OWN_FILE,
    OWN_NAME,
    STREAM_MAX_LENGTH,
    Clamd,
    clamd_server,
)
from prometheus_client import CollectorRegistry

from kithmail import config
from kithmail.layers import Action, Layer, SmtpReply, Verdict
from kithmail.layers.antivirus import (
    NAME_LIMIT,
    VERSION_INTERVAL,
    Antivirus,
    ClamdError,
    ScanResult,
    parse_reply,
    parse_version,
)
from kithmail.pipeline import MessageContext
from kithmail.tenants import TenantPolicy

NOW = 1_800_000_000.0  # the layer's clock: the gauge's age is exact
SIGNATURES_AGE = 3 * 86400 + 17
PASSWORD = b"infected"


# ---------------------------------------------------------------- messages


def message(body: str = "Hello,\nthe minutes are attached.\n", *attachments: Any) -> list[bytes]:
    """A message as the listener holds it: one line per item, CRLF kept.

    Each attachment is (filename, bytes, "type/subtype"), base64-encoded.
    """
    m = email.message.EmailMessage()
    m["From"] = "Ann <ann@example.net>"
    m["To"] = "bob@example.test"
    m["Subject"] = "minutes"
    m["Message-ID"] = "<av-test@example.net>"
    m.set_content(body)
    for filename, data, mime in attachments:
        maintype, subtype = mime.split("/")
        m.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    raw = m.as_bytes(policy=email.policy.SMTP)
    lines = raw.splitlines(keepends=True)
    assert all(line.endswith(b"\r\n") for line in lines)
    return lines


def zipped(*members: tuple[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            z.writestr(name, data)
    return out.getvalue()


def _crc_step(crc: int, byte: int) -> int:
    # One step of the CRC-32 register, without zlib's pre- and post-inversion.
    return zlib.crc32(bytes([byte]), crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def encrypted_zip(name: str, data: bytes, password: bytes) -> bytes:
    """A zip holding `data` stored and encrypted with PKWARE's traditional
    encryption (APPNOTE.TXT 6.1), written out by hand: Python's zipfile
    reads such archives but cannot write them."""
    keys = [0x12345678, 0x23456789, 0x34567890]

    def update(byte: int) -> None:
        keys[0] = _crc_step(keys[0], byte)
        keys[1] = ((keys[1] + (keys[0] & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        keys[2] = _crc_step(keys[2], keys[1] >> 24)

    for byte in password:
        update(byte)
    crc = zlib.crc32(data)
    # 11 bytes that would be random in real use, then the CRC's top byte,
    # which a reader checks to tell a wrong password.
    plain = bytes(range(1, 12)) + bytes([crc >> 24]) + data
    sealed = bytearray()
    for byte in plain:
        t = (keys[2] | 2) & 0xFFFF
        sealed.append(byte ^ ((t * (t ^ 1)) >> 8) & 0xFF)
        update(byte)
    fname = name.encode()
    # version 2.0, flag bit 0 (encrypted), method 0 (stored), 2024-01-01 00:00
    common = struct.pack("<HHHHHIII", 20, 1, 0, 0, 0x5821, crc, len(sealed), len(data))
    local = b"PK\x03\x04" + common + struct.pack("<HH", len(fname), 0) + fname + sealed
    central = (
        b"PK\x01\x02"
        + struct.pack("<H", 20)
        + common
        + struct.pack("<HHHHHII", len(fname), 0, 0, 0, 0, 0, 0)
        + fname
    )
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, len(central), len(local), 0)
    return local + central + end


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """One clamd for the module: our signatures and a daily database 3 days old."""
    created = int(time.time()) - 3 * 86400
    with clamd_server(tmp_path_factory.mktemp("clamd"), daily_time=created) as c:
        yield c


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def clock() -> list[float]:
    return [NOW]


@pytest.fixture
def layer(registry: CollectorRegistry, clock: list[float]) -> Antivirus:
    return Antivirus(registry=registry, clock=lambda: clock[0])


def context(data: list[bytes], **antivirus: Any) -> MessageContext:
    settings = config.from_mapping({"antivirus": antivirus})
    header = tuple(data[: data.index(b"\r\n")])
    return MessageContext(
        policy=TenantPolicy("default", settings),
        client_ip="198.51.100.7",
        helo="mail.example.net",
        mail_from="ann@example.net",
        recipients=("bob@example.test",),
        header=header,
        data=data,
    )


def scan(layer: Antivirus, data: list[bytes], **antivirus: Any) -> Verdict:
    return asyncio.run(layer(context(data, **antivirus)))


def count(registry: CollectorRegistry, result: str) -> float:
    v = registry.get_sample_value("kithmail_antivirus_scans_total", {"result": result})
    assert v is not None
    return v


def counts(registry: CollectorRegistry) -> dict[str, float]:
    results = ("clean", "virus", "unscannable", "error", "oversize")
    return {r: count(registry, r) for r in results if count(registry, r)}


def timed(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("kithmail_antivirus_seconds_count")


def age(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("kithmail_antivirus_signatures_age_seconds")


TRANSPORTS = pytest.mark.parametrize("transport", ["unix", "tcp"])


def address(clamd: Clamd, transport: str) -> str:
    return clamd.unix if transport == "unix" else clamd.tcp


# ---------------------------------------------------------------- fake peers


class FakeClamd:
    """A TCP server on loopback that reads a whole INSTREAM request, then
    answers `answer` and closes, or, with None, stays silent forever."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.connections = 0
        self.received = bytearray()
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        request = await reader.readuntil(b"\0")
        self.received += request
        if request == b"zINSTREAM\0":
            while True:
                (n,) = struct.unpack(">I", await reader.readexactly(4))
                if n == 0:
                    break
                self.received += await reader.readexactly(n)
        if self.answer is None:
            await reader.read()  # never answers; returns when the client gives up
            return
        writer.write(self.answer)
        await writer.drain()
        writer.close()

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FakeClamd]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for w in self._writers:
                w.close()
            await server.wait_closed()


def scan_fake(
    layer: Antivirus, answer: bytes | None, data: list[bytes], **antivirus: Any
) -> tuple[Verdict, FakeClamd]:
    fake = FakeClamd(answer)

    async def main() -> Verdict:
        async with fake.running():
            return await layer(context(data, clamd=fake.address, **antivirus))

    return asyncio.run(main()), fake


# ---------------------------------------------------------------- clean and found


@TRANSPORTS
def test_clean_message_is_accepted(
    layer: Antivirus, registry: CollectorRegistry, clamd: Clamd, transport: str
) -> None:
    v = scan(layer, message(), clamd=address(clamd, transport))
    assert (v.layer, v.action, v.reason, v.reply) == (
        Layer.ANTIVIRUS,
        Action.ACCEPT,
        "antivirus.clean",
        None,
    )
    assert not v.acts
    assert counts(registry) == {"clean": 1}
    assert timed(registry) == 1


@TRANSPORTS
def test_eicar_in_the_body_is_rejected_with_its_name(
    layer: Antivirus, registry: CollectorRegistry, clamd: Clamd, transport: str
) -> None:
    data = message(f"Please run this:\n{EICAR.decode()}\n")
    v = scan(layer, data, clamd=address(clamd, transport))
    assert (v.action, v.reason) == (Action.REJECT, "antivirus.virus")
    assert v.reply == SmtpReply(554, "5.7.0", f"Virus found: {EICAR_NAME}")
    assert EICAR_NAME in v.detail
    assert v.acts
    assert counts(registry) == {"virus": 1}


def test_eicar_in_a_base64_attachment(layer: Antivirus, clamd: Clamd) -> None:
    data = message("See attached.\n", ("tool.com", EICAR, "application/octet-stream"))
    raw = b"".join(data)
    assert EICAR not in raw and base64.b64encode(EICAR)[:40] in raw  # only clamd decodes it
    v = scan(layer, data, clamd=clamd.unix)
    assert (v.action, v.reason) == (Action.REJECT, "antivirus.virus")
    assert v.reply == SmtpReply(554, "5.7.0", f"Virus found: {EICAR_NAME}")


def test_eicar_inside_a_zip_attachment(layer: Antivirus, clamd: Clamd) -> None:
    archive = zipped(("readme.txt", b"nothing to see\n"), ("tools/eicar.com", EICAR))
    assert EICAR not in archive
    data = message("Archive attached.\n", ("tools.zip", archive, "application/zip"))
    v = scan(layer, data, clamd=clamd.tcp)
    assert (v.action, v.reason) == (Action.REJECT, "antivirus.virus")
    assert EICAR_NAME in v.detail


def test_a_clean_zip_is_clean(layer: Antivirus, clamd: Clamd) -> None:
    archive = zipped(("minutes.txt", b"Present: Ann, Bob.\n" * 200))
    v = scan(
        layer, message("Zip attached.\n", ("m.zip", archive, "application/zip")), clamd=clamd.unix
    )
    assert v.reason == "antivirus.clean"


def test_our_own_signature_by_hash(layer: Antivirus, clamd: Clamd) -> None:
    data = message("Invoice attached.\n", ("invoice.pdf", OWN_FILE, "application/pdf"))
    v = scan(layer, data, clamd=clamd.unix)
    assert (v.action, v.reason) == (Action.REJECT, "antivirus.virus")
    assert v.reply == SmtpReply(554, "5.7.0", f"Virus found: {OWN_NAME}")
    # The hash covers the whole file: the same bytes plus one are clean.
    data = message("Invoice attached.\n", ("invoice.pdf", OWN_FILE + b" ", "application/pdf"))
    assert scan(layer, data, clamd=clamd.unix).reason == "antivirus.clean"


def test_a_signature_from_the_daily_database(layer: Antivirus, clamd: Clamd) -> None:
    v = scan(layer, message(f"token {DAILY_STRING.decode()}\n"), clamd=clamd.unix)
    assert (v.reason, v.detail) == ("antivirus.virus", f"signature {DAILY_NAME}")


@pytest.mark.parametrize(
    ("on_virus", "action", "reply"),
    [
        (
            "defer",
            Action.DEFER,
            SmtpReply(451, "4.7.0", f"Virus found: {EICAR_NAME}, try again later"),
        ),
        ("quarantine", Action.QUARANTINE, None),
        ("tag", Action.TAG, None),
        ("accept", Action.ACCEPT, None),
    ],
)
def test_on_virus_takes_the_configured_action(
    layer: Antivirus, clamd: Clamd, on_virus: str, action: Action, reply: SmtpReply | None
) -> None:
    v = scan(layer, message(EICAR.decode() + "\n"), clamd=clamd.unix, on_virus=on_virus)
    assert (v.action, v.reason, v.reply) == (action, "antivirus.virus", reply)
    assert EICAR_NAME in v.detail


# ---------------------------------------------------------------- not fully scanned


def test_an_encrypted_zip_is_not_clean(
    layer: Antivirus, registry: CollectorRegistry, clamd: Clamd
) -> None:
    archive = encrypted_zip("eicar.com", EICAR, PASSWORD)
    with zipfile.ZipFile(io.BytesIO(archive)) as z:  # a real archive: it opens
        assert z.read("eicar.com", pwd=PASSWORD) == EICAR
    data = message("Password: infected\n", ("secret.zip", archive, "application/zip"))
    v = scan(layer, data, clamd=clamd.unix)
    assert (v.action, v.reason) == (Action.REJECT, "antivirus.unscannable")
    assert v.detail == "not fully scanned: Heuristics.Encrypted.Zip"
    assert v.reply == SmtpReply(
        554, "5.7.0", "Attachment could not be scanned: Heuristics.Encrypted.Zip"
    )
    assert counts(registry) == {"unscannable": 1}


def test_an_encrypted_zip_of_harmless_bytes_is_not_clean_either(
    layer: Antivirus, clamd: Clamd
) -> None:
    archive = encrypted_zip("notes.txt", b"only notes\n", PASSWORD)
    v = scan(layer, message("x\n", ("n.zip", archive, "application/zip")), clamd=clamd.unix)
    assert v.reason == "antivirus.unscannable"


def test_zips_nested_past_clamds_recursion_limit_are_not_clean(
    layer: Antivirus, clamd: Clamd
) -> None:
    archive = zipped(("eicar.com", EICAR))
    for depth in range(MAX_RECURSION + 2):
        archive = zipped((f"level{depth}.zip", archive))
    data = message("Nested.\n", ("nested.zip", archive, "application/zip"))
    v = scan(layer, data, clamd=clamd.unix)
    assert v.reason == "antivirus.unscannable"
    assert v.detail == "not fully scanned: Heuristics.Limits.Exceeded.MaxRecursion"


@pytest.mark.parametrize(
    ("settings", "action", "reply"),
    [
        ({}, Action.REJECT, 554),  # unset: as on_virus
        ({"on_virus": "defer"}, Action.DEFER, 451),
        ({"on_unscannable": "quarantine"}, Action.QUARANTINE, None),
        ({"on_virus": "reject", "on_unscannable": "defer"}, Action.DEFER, 451),
    ],
)
def test_unscannable_takes_on_unscannable_or_on_virus(
    layer: Antivirus, clamd: Clamd, settings: dict[str, str], action: Action, reply: int | None
) -> None:
    archive = encrypted_zip("a.txt", b"a\n", PASSWORD)
    v = scan(
        layer, message("x\n", ("a.zip", archive, "application/zip")), clamd=clamd.unix, **settings
    )
    assert (v.action, v.reason) == (action, "antivirus.unscannable")
    assert (v.reply.code if v.reply else None) == reply


# ---------------------------------------------------------------- errors: never clean


@TRANSPORTS
def test_clamd_stopped_is_an_error_deferred_by_default(
    tmp_path: Path, layer: Antivirus, registry: CollectorRegistry, transport: str
) -> None:
    with clamd_server(tmp_path, daily_time=None) as own:
        where = address(own, transport)
        assert scan(layer, message(), clamd=where).reason == "antivirus.clean"
        own.stop()
        v = scan(layer, message(), clamd=where)
    assert (v.action, v.reason) == (Action.DEFER, "antivirus.error")
    assert v.reply == SmtpReply(451, "4.7.0", "Virus scan not available, try again later")
    assert v.detail.startswith(f"cannot connect to clamd at {where}: ")
    assert counts(registry) == {"clean": 1, "error": 1}


def test_clamd_stopped_with_on_error_reject(tmp_path: Path, layer: Antivirus) -> None:
    with clamd_server(tmp_path, daily_time=None) as own:
        own.stop()
        v = scan(layer, message(), clamd=own.tcp, on_error="reject")
    assert (v.action, v.reason) == (Action.REJECT, "antivirus.error")
    assert v.reply == SmtpReply(554, "5.7.0", "Virus scan not available")


def test_a_server_that_never_answers_times_out(
    layer: Antivirus, registry: CollectorRegistry
) -> None:
    v, fake = scan_fake(layer, None, message(), timeout="300ms")
    assert fake.connections == 1 and bytes(fake.received).startswith(b"zINSTREAM\0")
    assert (v.action, v.reason) == (Action.DEFER, "antivirus.error")
    assert v.detail == f"no answer from clamd at {fake.address} within 0.3s"
    assert counts(registry) == {"error": 1}
    assert timed(registry) == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"stream: MAYBE\0",  # neither OK nor FOUND
        b"stream: OK",  # no NUL: cut short
        b"stream: OK\0stream: OK\0",  # twice
        b"stream: OK\0stream: Eicar FOUND\0",  # clean and not
        b"stream: FOUND\0",  # no name
        b"stream:  FOUND\0",  # a blank name
        b"Stream: Eicar FOUND\0",  # not clamd's spelling
        b"PONG\0",
        b"UNKNOWN COMMAND\0",
        b"stream: Can't allocate memory ERROR\0",
        b"INSTREAM size limit exceeded. ERROR\0",
        b"stream: OK\0" + b"x" * 10000,  # too long to be clamd
        b"\xff\xfe\0",
    ],
)
def test_an_answer_that_is_not_understood_is_an_error(
    layer: Antivirus, registry: CollectorRegistry, answer: bytes
) -> None:
    v, fake = scan_fake(layer, answer, message(EICAR.decode() + "\n"))
    assert fake.connections == 1
    assert (v.action, v.reason) == (Action.DEFER, "antivirus.error")
    assert v.reply == SmtpReply(451, "4.7.0", "Virus scan not available, try again later")
    assert counts(registry) == {"error": 1}


def test_a_server_that_hangs_up_without_answering(layer: Antivirus) -> None:
    v, _ = scan_fake(layer, b"", message())
    assert v.reason == "antivirus.error"
    assert "closed without an answer" in v.detail


def test_the_whole_message_reaches_clamd(layer: Antivirus) -> None:
    # Several INSTREAM chunks; the fake reassembles them.
    data = message("line of text\n" * 20000)
    v, fake = scan_fake(layer, b"stream: OK\0", data)
    assert v.reason == "antivirus.clean"
    # (then the first scan's VERSION query)
    assert bytes(fake.received) == b"zINSTREAM\0" + b"".join(data) + b"zVERSION\0"


def test_a_message_over_clamds_stream_limit_is_an_error(layer: Antivirus, clamd: Clamd) -> None:
    # [antivirus] max_size above clamd's StreamMaxLength: clamd refuses
    # mid-stream and hangs up; its answer is still read.
    data = message()
    data += [b"y" * 998 + b"\r\n"] * (STREAM_MAX_LENGTH // 1000 + 10)
    for where in (clamd.unix, clamd.tcp):
        v = scan(layer, data, clamd=where, max_size=STREAM_MAX_LENGTH * 2)
        assert (v.action, v.reason) == (Action.DEFER, "antivirus.error")
        assert "StreamMaxLength" in v.detail


def test_a_hostile_signature_name_is_made_printable_and_bounded(layer: Antivirus) -> None:
    name = "Evil\x1b[31m\u202eName\t" + "A" * 300
    v, _ = scan_fake(layer, f"stream: {name} FOUND\0".encode("latin-1", "replace"), message())
    assert v.reason == "antivirus.virus"
    assert v.reply is not None
    shown = v.reply.text.removeprefix("Virus found: ")
    assert shown.startswith("Evil?[31m?Name?AAA") and shown.endswith("...")
    assert len(shown) == NAME_LIMIT
    assert all("!" <= c <= "~" for c in v.reply.text.replace(" ", ""))
    assert v.detail == f"signature {shown}"


# ---------------------------------------------------------------- size, shadow, off


def test_over_max_size_is_not_sent_and_takes_on_oversize(
    layer: Antivirus, registry: CollectorRegistry
) -> None:
    data = message("z" * 5000 + "\n")
    v, fake = scan_fake(layer, b"stream: OK\0", data, max_size=4096)
    assert fake.connections == 0
    assert (v.action, v.reason, v.reply) == (Action.ACCEPT, "antivirus.oversize", None)
    assert v.detail == f"{len(b''.join(data))} bytes, over max_size 4096: not scanned"
    assert counts(registry) == {"oversize": 1}
    assert timed(registry) == 0

    v, fake = scan_fake(layer, b"stream: OK\0", data, max_size=4096, on_oversize="reject")
    assert fake.connections == 0
    assert (v.action, v.reason) == (Action.REJECT, "antivirus.oversize")
    assert v.reply == SmtpReply(554, "5.7.0", "Message too large to scan for viruses")


def test_at_max_size_exactly_is_scanned(layer: Antivirus, clamd: Clamd) -> None:
    data = message()
    v = scan(layer, data, clamd=clamd.unix, max_size=len(b"".join(data)))
    assert v.reason == "antivirus.clean"


def test_shadow_mode_records_without_acting(
    tmp_path: Path, layer: Antivirus, registry: CollectorRegistry, clamd: Clamd
) -> None:
    v = scan(layer, message(EICAR.decode() + "\n"), clamd=clamd.unix, mode="shadow")
    assert (v.action, v.reason, v.shadow, v.acts) == (Action.REJECT, "antivirus.virus", True, False)
    assert EICAR_NAME in v.detail

    v = scan(layer, message(), clamd=clamd.unix, mode="shadow")
    assert (v.action, v.reason, v.shadow) == (Action.ACCEPT, "antivirus.clean", False)

    archive = encrypted_zip("a.txt", b"a\n", PASSWORD)
    data = message("x\n", ("a.zip", archive, "application/zip"))
    v = scan(layer, data, clamd=clamd.unix, mode="shadow")
    assert (v.reason, v.shadow, v.acts) == ("antivirus.unscannable", True, False)

    with clamd_server(tmp_path, daily_time=None) as own:
        own.stop()
        v = scan(layer, message(), clamd=own.unix, mode="shadow")
    assert (v.action, v.reason, v.shadow, v.acts) == (Action.DEFER, "antivirus.error", True, False)

    v, _ = scan_fake(
        layer, b"", message("q" * 100), max_size=10, mode="shadow", on_oversize="reject"
    )
    assert (v.reason, v.shadow, v.acts) == ("antivirus.oversize", True, False)
    assert counts(registry) == {"clean": 1, "virus": 1, "unscannable": 1, "error": 1, "oversize": 1}


def test_no_clamd_configured_is_off(layer: Antivirus, registry: CollectorRegistry) -> None:
    v = scan(layer, message(EICAR.decode() + "\n"))
    assert (v.action, v.reason, v.acts) == (Action.ACCEPT, "antivirus.off", False)
    assert counts(registry) == {}
    assert timed(registry) == 0


# ---------------------------------------------------------------- signature age


def test_the_signature_age_comes_from_clamds_version(
    layer: Antivirus, registry: CollectorRegistry, clock: list[float], clamd: Clamd
) -> None:
    assert clamd.signatures_time is not None
    assert age(registry) is None  # unknown until clamd was asked
    assert scan(layer, message(), clamd=clamd.unix).reason == "antivirus.clean"
    assert age(registry) == NOW - clamd.signatures_time
    # The age grows with the clock between VERSION queries.
    clock[0] += 100
    assert scan(layer, message(), clamd=clamd.tcp).reason == "antivirus.clean"
    assert age(registry) == NOW + 100 - clamd.signatures_time


def test_refresh_version_by_hand(
    layer: Antivirus, registry: CollectorRegistry, clamd: Clamd
) -> None:
    av = config.from_mapping({"antivirus": {"clamd": clamd.tcp}}).antivirus
    assert asyncio.run(layer.refresh_version(av)) == clamd.signatures_time
    assert age(registry) == NOW - float(clamd.signatures_time or 0)
    assert asyncio.run(layer.refresh_version(config.Antivirus())) is None  # off


def test_clamds_version_reply_as_clamd_sends_it(clamd: Clamd) -> None:
    async def ask() -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(clamd.socket_path))
        writer.write(b"zVERSION\0")
        raw = await reader.read()
        writer.close()
        await writer.wait_closed()
        return raw

    raw = asyncio.run(ask())
    assert raw.startswith(b"ClamAV 1.") and f"/{DAILY_VERSION}/".encode() in raw
    assert parse_version(raw) == clamd.signatures_time


def test_no_daily_database_leaves_the_age_unset(
    tmp_path: Path, layer: Antivirus, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    with clamd_server(tmp_path, daily_time=None) as own, caplog.at_level(logging.WARNING):
        assert scan(layer, message(), clamd=own.unix).reason == "antivirus.clean"
        av = config.from_mapping({"antivirus": {"clamd": own.unix}}).antivirus
        assert asyncio.run(layer.refresh_version(av)) is None
    assert age(registry) is None
    assert any("no signature date" in r.getMessage() for r in caplog.records)


def test_a_clamd_that_is_down_leaves_the_age_unset(
    tmp_path: Path, layer: Antivirus, registry: CollectorRegistry
) -> None:
    with clamd_server(tmp_path, daily_time=int(NOW)) as own:
        own.stop()
        av = config.from_mapping({"antivirus": {"clamd": own.unix}}).antivirus
        assert asyncio.run(layer.refresh_version(av)) is None
    assert age(registry) is None


def test_version_is_asked_at_most_once_per_interval(layer: Antivirus) -> None:
    # Counted on fakes (clamd does not log VERSION commands): per clamd
    # address, the first scan is followed by one VERSION, the next scans
    # within VERSION_INTERVAL by none.
    fakes = [FakeClamd(b"stream: OK\0") for _ in range(2)]

    async def main() -> list[bytes]:
        for fake in fakes:
            async with fake.running():
                for _ in range(3):
                    v = await layer(context(message(), clamd=fake.address))
                    assert v.reason == "antivirus.clean"
        return [bytes(f.received) for f in fakes]

    assert VERSION_INTERVAL >= 60
    for received in asyncio.run(main()):
        assert received.count(b"zINSTREAM\0") == 3
        assert received.count(b"zVERSION\0") == 1


# ---------------------------------------------------------------- the parsers alone


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"stream: OK\0", ScanResult("clean")),
        (b"stream: Eicar-Signature FOUND\0", ScanResult("virus", "Eicar-Signature")),
        (
            b"stream: Heuristics.Encrypted.Zip FOUND\0",
            ScanResult("unscannable", "Heuristics.Encrypted.Zip"),
        ),
        (
            b"stream: Heuristics.Limits.Exceeded.MaxFiles FOUND\0",
            ScanResult("unscannable", "Heuristics.Limits.Exceeded.MaxFiles"),
        ),
        # AllMatchScan: a real signature outranks an unscannable archive.
        (
            b"stream: Heuristics.Encrypted.Zip FOUND\0stream: Win.Test.EICAR_HDB-1 FOUND\0",
            ScanResult("virus", "Win.Test.EICAR_HDB-1"),
        ),
    ],
)
def test_parse_reply(raw: bytes, expected: ScanResult) -> None:
    assert parse_reply(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"ClamAV 1.0.7/27432/Mon Oct 14 08:37:25 2024\0", (2024, 10, 14, 8, 37, 25)),
        (b"ClamAV 1.4.6/27001/Sun Nov  2 04:05:06 2026\0", (2026, 11, 2, 4, 5, 6)),
        (b"ClamAV 1.4.6\0", None),
        (b"ClamAV 1.4.6/27001/\0", None),
        (b"ClamAV 1.4.6/27001/yesterday\0", None),
        (b"ClamAV 1.4.6/x/Sun Nov  2 04:05:06 2026\0", None),
        (b"\0", None),
    ],
)
def test_parse_version(raw: bytes, expected: tuple[int, ...] | None) -> None:
    got = parse_version(raw)
    if expected is None:
        assert got is None
    else:
        assert got is not None and time.localtime(got)[:6] == expected


def test_parse_reply_refuses_what_is_not_clamd() -> None:
    for raw in (b"", b"stream: OK", b"stream: OK\0\0", b"ok\0"):
        with pytest.raises(ClamdError):
            parse_reply(raw)
