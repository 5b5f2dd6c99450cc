"""bench/smtp.py's own SMTP clients: the latency probe and the never-seen flood.

`smtp-source` (Postfix's C load generator) makes the load, but it prints no
per-transaction times and cannot bind a source address. So:

- `probe` runs sequential transactions beside it, timing each one: with
  ``reuse`` one connection and MAIL, RCPT, DATA (the message), timed from
  MAIL to the reply to the final dot; otherwise a new connection each time,
  timed from connect to the reply to QUIT (connect, 220, EHLO, MAIL, RCPT,
  DATA, the message, QUIT).
- `flood` opens connections from never-seen addresses (each connection
  binds its own 127.x.y.z), says EHLO, MAIL and RCPT, expects ``451 4.7.1``
  at RCPT and says QUIT: how a greylisting gateway spends its time on the
  spam engines that never retry.

Both use plain asyncio streams and speak only the commands above (no
PIPELINING, no STARTTLS). A reply is read to its last line ("NNN " rather
than "NNN-").

`message` builds the seeded 5 KiB test message both `smtp-source -F` and the
probe send.

Trusts: the servers it talks to are the benchmark's own, on loopback. Every
name is under example.* or .test (RFC 2606).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import random
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

CRLF = b"\r\n"
WORDS = (
    "quarterly",
    "invoice",
    "shipment",
    "meeting",
    "notes",
    "attached",
    "review",
    "budget",
    "figures",
    "agenda",
    "the",
    "of",
    "and",
    "to",
    "in",
    "for",
    "on",
    "with",
    "at",
    "by",
    "from",
    "project",
    "update",
    "schedule",
    "please",
    "find",
    "regards",
    "thanks",
    "team",
    "report",
    "draft",
    "final",
    "summary",
    "customer",
    "order",
    "account",
    "balance",
)


def message(rng: random.Random, size: int, sender: str, rcpt: str, helo: str) -> bytes:
    """A plain-text message of exactly `size` bytes on the wire (CRLF lines).

    Headers a real client sends, then seeded words in lines of at most 76
    characters. No line starts with "." (smtp-source -F and the probe would
    both stuff it; the sizes would then differ from `size`).
    """
    head = [
        f"From: Bench Sender <{sender}>",
        f"To: <{rcpt}>",
        "Subject: kithmail benchmark message",
        "Date: Mon, 01 Jan 2024 00:00:00 +0000",
        f"Message-ID: <bench.{rng.getrandbits(64):016x}@{helo}>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
    ]
    out = CRLF.join(x.encode() for x in head) + CRLF
    lines: list[bytes] = []
    used = len(out)
    while True:
        words: list[str] = []
        while len(" ".join(words)) < 60:
            words.append(rng.choice(WORDS))
        line = " ".join(words).capitalize().encode()
        if used + len(line) + 2 > size:
            break
        lines.append(line)
        used += len(line) + 2
    body = b"".join(x + CRLF for x in lines)
    pad = size - len(out) - len(body)
    if pad > 2:
        body += b"x" * (pad - 2) + CRLF
    msg = out + body
    if len(msg) != size:
        raise ValueError(f"message is {len(msg)} bytes, not {size}")
    return msg


class SmtpError(Exception):
    """An unexpected reply; `code` is its 3-digit code (0: connection lost)."""

    def __init__(self, stage: str, code: int, text: str) -> None:
        super().__init__(f"{stage}: {code} {text}")
        self.stage = stage
        self.code = code
        self.text = text


async def reply(reader: asyncio.StreamReader, stage: str) -> tuple[int, str]:
    """Read one (possibly multi-line) reply: (code, its last line)."""
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise SmtpError(stage, 0, "connection closed")
        if len(line) < 4:
            raise SmtpError(stage, 0, f"bad reply {line!r}")
        if line[3:4] != b"-":
            return int(line[:3]), line.decode("latin-1").rstrip()


async def expect(reader: asyncio.StreamReader, stage: str, want: int) -> str:
    code, text = await reply(reader, stage)
    if code != want:
        raise SmtpError(stage, code, text)
    return text


async def connect(
    host: str, port: int, source: str | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    local = (source, 0) if source else None
    reader, writer = await asyncio.open_connection(host, port, local_addr=local, limit=1 << 16)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def transaction(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    sender: str,
    rcpt: str,
    data: bytes,
) -> str:
    """MAIL, RCPT, DATA and the message; the reply to the final dot."""
    writer.write(f"MAIL FROM:<{sender}>\r\n".encode())
    await expect(reader, "MAIL", 250)
    writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
    await expect(reader, "RCPT", 250)
    writer.write(b"DATA\r\n")
    await expect(reader, "DATA", 354)
    writer.write(data + b".\r\n")
    return await expect(reader, "end of DATA", 250)


@dataclass
class ProbeResult:
    mode: str  # "reuse" or "new"
    transactions: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    lat: array.array[int] = field(default_factory=lambda: array.array("q"))
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "timed": "MAIL to the reply to the final dot, one connection"
            if self.mode == "reuse"
            else "connect to the reply to QUIT, a new connection each",
            "transactions": self.transactions,
            "seconds": round(self.seconds, 3),
            "tps": round(self.transactions / self.seconds, 1) if self.seconds else None,
            **percentiles(self.lat),
            "errors": dict(self.errors),
            "error_examples": self.examples,
        }


def percentiles(lat: array.array[int]) -> dict[str, float | None]:
    s = sorted(lat)
    n = len(s)

    def pct(p: float) -> float | None:
        return round(s[min(n - 1, int(p * n))] / 1e6, 3) if n else None

    return {
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": round(s[-1] / 1e6, 3) if n else None,
        "mean_ms": round(sum(s) / n / 1e6, 3) if n else None,
    }


async def probe(
    host: str,
    port: int,
    *,
    mode: str,
    sender: str,
    rcpt: str,
    helo: str,
    data: bytes,
    stop: asyncio.Event,
    limit: int = 1 << 30,
    source: str | None = "127.0.0.1",
) -> ProbeResult:
    """Sequential transactions until `stop` is set or `limit` were made."""
    r = ProbeResult(mode)
    t0 = time.perf_counter()
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None

    def failed(e: BaseException) -> None:
        key = f"{e.stage} {e.code}" if isinstance(e, SmtpError) else type(e).__name__
        r.errors[key] += 1
        if len(r.examples) < 5:
            r.examples.append(str(e)[:200])

    while not stop.is_set() and r.transactions < limit:
        try:
            if mode == "reuse":
                if writer is None:
                    reader, writer = await connect(host, port, source)
                    await expect(reader, "greeting", 220)
                    writer.write(f"EHLO {helo}\r\n".encode())
                    await expect(reader, "EHLO", 250)
                assert reader is not None
                t = time.perf_counter_ns()
                await transaction(reader, writer, sender, rcpt, data)
                r.lat.append(time.perf_counter_ns() - t)
            else:
                t = time.perf_counter_ns()
                rd, wr = await connect(host, port, source)
                try:
                    await expect(rd, "greeting", 220)
                    wr.write(f"EHLO {helo}\r\n".encode())
                    await expect(rd, "EHLO", 250)
                    await transaction(rd, wr, sender, rcpt, data)
                    wr.write(b"QUIT\r\n")
                    await expect(rd, "QUIT", 221)
                finally:
                    await close(wr)
                r.lat.append(time.perf_counter_ns() - t)
            r.transactions += 1
        except (SmtpError, OSError) as e:
            failed(e)
            if writer is not None:
                await close(writer)
            reader = writer = None
            if sum(r.errors.values()) >= 100:
                break
            await asyncio.sleep(0.05)  # a failing server: do not spin on it
    if writer is not None:
        with contextlib.suppress(SmtpError, OSError):
            writer.write(b"QUIT\r\n")
            assert reader is not None
            await expect(reader, "QUIT", 221)
        await close(writer)
    r.seconds = time.perf_counter() - t0
    return r


async def transact_once(
    host: str, port: int, *, source: str, sender: str, rcpt: str, helo: str, data: bytes
) -> tuple[int, str]:
    """One whole transaction; (code, text) of the first non-success reply, or the final 250."""
    reader, writer = await connect(host, port, source)
    try:
        await expect(reader, "greeting", 220)
        writer.write(f"EHLO {helo}\r\n".encode())
        await expect(reader, "EHLO", 250)
        try:
            text = await transaction(reader, writer, sender, rcpt, data)
            code = 250
        except SmtpError as e:
            code, text = e.code, e.text
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(SmtpError, OSError):
            await reply(reader, "QUIT")
        return code, text
    finally:
        await close(writer)


# --------------------------------------------------------------------------
# The flood of never-seen sources


def flood_sources(rng: random.Random, n: int) -> list[str]:
    """n distinct addresses in 127.1.0.0-127.254.255.254, in a seeded order.

    127.0.0.0/16 is left out: the load generator and the servers live there.
    """
    space = 254 * 65536
    if n > space // 2:
        raise ValueError(f"at most {space // 2:,} flood sources")
    picked = rng.sample(range(space), n)
    out = []
    for x in picked:
        b, c, d = 1 + x // 65536, (x >> 8) & 255, x & 255
        if d in (0, 255):
            d = 1 + (x % 253)
        out.append(f"127.{b}.{c}.{d}")
    # Folding .0/.255 may repeat an address: keep the first of each.
    return list(dict.fromkeys(out))


@dataclass
class FloodResult:
    connections: int = 0  # connections that got an RCPT reply
    answers: Counter[str] = field(default_factory=Counter)  # "451 4.7.1", "250 2.1.5", ...
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    lat: array.array[int] = field(default_factory=lambda: array.array("q"))
    seconds: float = 0.0
    sources_used: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "sources_used": self.sources_used,
            "seconds": round(self.seconds, 3),
            "cps": round(self.connections / self.seconds, 1) if self.seconds else None,
            "timed": "connect to the reply to QUIT (220, EHLO, MAIL, RCPT answered 451, QUIT)",
            **percentiles(self.lat),
            "answers": dict(self.answers),
            "errors": dict(self.errors),
            "error_examples": self.examples,
        }


async def _flood_one(
    host: str, port: int, source: str, helo: str, sender: str, rcpt: str, r: FloodResult
) -> None:
    t = time.perf_counter_ns()
    try:
        reader, writer = await connect(host, port, source)
    except OSError as e:
        r.errors[f"connect {type(e).__name__}"] += 1
        if len(r.examples) < 5:
            r.examples.append(f"{source}: {e}")
        return
    try:
        await expect(reader, "greeting", 220)
        writer.write(f"EHLO {helo}\r\n".encode())
        await expect(reader, "EHLO", 250)
        writer.write(f"MAIL FROM:<{sender}>\r\n".encode())
        await expect(reader, "MAIL", 250)
        writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
        code, text = await reply(reader, "RCPT")
        writer.write(b"QUIT\r\n")
        await reply(reader, "QUIT")
        r.lat.append(time.perf_counter_ns() - t)
        r.connections += 1
        parts = text.split(None, 2)
        key = " ".join(parts[:2]) if len(parts) > 1 and parts[1][:1].isdigit() else str(code)
        r.answers[key] += 1
    except (SmtpError, OSError) as e:
        key = f"{e.stage} {e.code}" if isinstance(e, SmtpError) else type(e).__name__
        r.errors[key] += 1
        if len(r.examples) < 5:
            r.examples.append(f"{source}: {e}"[:200])
    finally:
        await close(writer)


async def flood(
    host: str,
    port: int,
    sources: Iterator[str],
    *,
    concurrency: int,
    seconds: float,
    limit: int,
    sender_domain: str,
    rcpt: str,
) -> FloodResult:
    """`concurrency` workers, each taking the next never-seen source, until time or sources run out."""
    r = FloodResult()
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline and r.sources_used < limit:
            src = next(sources, None)
            if src is None:
                return
            r.sources_used += 1
            n = r.sources_used
            await _flood_one(
                host,
                port,
                src,
                f"mx{n}.{sender_domain}",
                f"promo{n}@{sender_domain}",
                rcpt,
                r,
            )

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    r.seconds = time.perf_counter() - t0
    return r
