"""A small async LMTP client: LHLO, MAIL, RCPT, streamed DATA, one reply per recipient.

aiosmtplib speaks SMTP only; LMTP differs in the greeting verb (LHLO) and
in the end of DATA, where the server answers once for every recipient it
accepted at RCPT, in RCPT order (RFC 2033 §4.2). This client speaks just
enough of it for delivery and call-ahead, on asyncio streams.

Trusts nothing from the server: every read has a deadline, a reply line is
capped at `MAX_LINE` bytes and a multi-line reply at `MAX_LINES` lines, a
malformed reply is an `LmtpError` (a temporary failure to the caller), and
reply text is kept as one line with control characters replaced. The
message goes out as it was spooled (CRLF lines), dot-stuffed on the fly
and streamed in chunks, never held whole.

Standards: RFC 2033 (LMTP), RFC 5321 §4.1.1.4 and §4.5.2 (DATA,
transparency), §4.2 (reply syntax), RFC 2034 (enhanced status codes, kept
in the text), RFC 6531 and RFC 6152 (SMTPUTF8, 8BITMIME as MAIL parameters).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

__all__ = ["MAX_LINE", "MAX_LINES", "DotStuffer", "LmtpClient", "LmtpError", "Reply"]

MAX_LINE = 4096  # RFC 5321 §4.5.3.1.5 says 512 for a reply line; be generous
MAX_LINES = 100  # lines of one multi-line reply (an LHLO reply lists extensions)
_REPLY = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class LmtpError(Exception):
    """The session broke: no reply in time, a closed connection, a garbled reply."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One server reply: code and its text lines joined by spaces."""

    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


class DotStuffer:
    """The message made transparent (RFC 5321 §4.5.2), one chunk at a time.

    A line that starts with "." gets another; the only state carried from
    one chunk to the next is whether the last byte ended a line, so how the
    input is chunked never changes the output. `end` gives the terminator,
    with the CRLF the data's last line may lack.
    """

    def __init__(self) -> None:
        self._line_start = True

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out = chunk.replace(b"\n.", b"\n..")
        if self._line_start and out.startswith(b"."):
            out = b"." + out
        self._line_start = out.endswith(b"\n")
        return out

    def end(self) -> bytes:
        return b".\r\n" if self._line_start else b"\r\n.\r\n"


class LmtpClient:
    """One LMTP session. Use `connect`, then the verbs in protocol order, then `close`.

    `timeout` bounds every single read and write (the caller bounds the
    whole attempt). Commands are sent one at a time: no PIPELINING.
    """

    def __init__(self, host: str, port: int, *, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.extensions: dict[str, str] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self, local_hostname: str) -> Reply:
        """Open the connection, read the greeting, send LHLO; the LHLO reply."""
        try:
            async with asyncio.timeout(self.timeout):
                self._reader, self._writer = await asyncio.open_connection(
                    self.host, self.port, limit=MAX_LINE + 2
                )
        except (OSError, TimeoutError) as e:
            raise LmtpError(f"connecting to {self.host}:{self.port}: {_why(e)}") from None
        greeting = await self.read_reply()
        if not greeting.ok:
            return greeting
        reply, lines = await self._command_lines(b"LHLO " + _ascii(local_hostname))
        if reply.ok:
            for line in lines[1:]:
                keyword, _, params = line.partition(" ")
                self.extensions[keyword.upper()] = params
        return reply

    def supports(self, extension: str) -> bool:
        return extension.upper() in self.extensions

    async def mail(self, sender: str, options: Iterable[str] = ()) -> Reply:
        line = b"MAIL FROM:<" + _addr(sender) + b">"
        for o in options:
            line += b" " + _ascii(o)
        return await self.command(line)

    async def rcpt(self, recipient: str) -> Reply:
        return await self.command(b"RCPT TO:<" + _addr(recipient) + b">")

    async def data(self, chunks: AsyncIterator[bytes], accepted: int) -> list[Reply]:
        """Send the message; one reply per recipient accepted at RCPT, in order.

        A 354 refusal is answered for every recipient with that reply.
        """
        go = await self.command(b"DATA")
        if go.code != 354:
            return [go] * accepted
        stuffer = DotStuffer()
        async for chunk in chunks:
            await self._write(stuffer.feed(chunk))
        await self._write(stuffer.end())
        return [await self.read_reply() for _ in range(accepted)]

    async def rset(self) -> Reply:
        return await self.command(b"RSET")

    async def quit(self) -> None:
        """Say QUIT politely and close; a server that went away is not an error here."""
        try:
            await self.command(b"QUIT")
        except LmtpError:
            pass
        finally:
            await self.close()

    async def close(self) -> None:
        w, self._writer = self._writer, None
        if w is None:
            return
        w.close()
        try:
            async with asyncio.timeout(self.timeout):
                await w.wait_closed()
        except (OSError, TimeoutError):
            pass

    async def command(self, line: bytes) -> Reply:
        reply, _ = await self._command_lines(line)
        return reply

    async def _command_lines(self, line: bytes) -> tuple[Reply, list[str]]:
        if b"\r" in line or b"\n" in line:
            raise ValueError("an LMTP command is one line")
        await self._write(line + b"\r\n")
        return await self._read_lines()

    async def read_reply(self) -> Reply:
        reply, _ = await self._read_lines()
        return reply

    async def _read_lines(self) -> tuple[Reply, list[str]]:
        if self._reader is None:
            raise LmtpError("not connected")
        lines: list[str] = []
        code = b""
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    raw = await self._reader.readuntil(b"\n")
            except TimeoutError:
                raise LmtpError(
                    f"no reply from {self.host}:{self.port} within {self.timeout:g}s"
                ) from None
            except asyncio.IncompleteReadError:
                raise LmtpError(f"{self.host}:{self.port} closed the connection") from None
            except asyncio.LimitOverrunError:
                raise LmtpError(f"{self.host}:{self.port} sent a reply line too long") from None
            except OSError as e:
                raise LmtpError(f"reading from {self.host}:{self.port}: {_why(e)}") from None
            m = _REPLY.fullmatch(raw.rstrip(b"\r\n"))
            if m is None or (code and m.group(1) != code):
                raise LmtpError(f"{self.host}:{self.port} sent a malformed reply {raw[:80]!r}")
            code = m.group(1)
            lines.append(_CONTROL.sub("?", (m.group(3) or b"").decode("utf-8", "replace")))
            if m.group(2) != b"-":
                return Reply(int(code), " ".join(lines)), lines
            if len(lines) >= MAX_LINES:
                raise LmtpError(f"{self.host}:{self.port} sent a reply of too many lines")

    async def _write(self, data: bytes) -> None:
        if self._writer is None:
            raise LmtpError("not connected")
        try:
            async with asyncio.timeout(self.timeout):
                self._writer.write(data)
                await self._writer.drain()
        except TimeoutError:
            raise LmtpError(
                f"{self.host}:{self.port} stopped reading for {self.timeout:g}s"
            ) from None
        except OSError as e:
            raise LmtpError(f"writing to {self.host}:{self.port}: {_why(e)}") from None


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    return (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__


def _ascii(text: str) -> bytes:
    return _addr(text)


def _addr(text: str) -> bytes:
    # Non-ASCII only with SMTPUTF8, which the caller asked for when needed;
    # never a line break or a control character into a command.
    if _CONTROL.search(text):
        raise ValueError(f"control character in {text!r}")
    return text.encode("utf-8")
