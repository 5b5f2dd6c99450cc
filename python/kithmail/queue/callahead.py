"""Call-ahead: ask the downstream server whether a recipient exists, and remember.

With `[domains] verify_recipients = "downstream"` the SMTP listener asks
`CallAhead.check(address)` at RCPT. A probe is one short session with the
downstream (smtp:// through aiosmtplib, lmtp:// through
`kithmail.queue.lmtp`): ``MAIL FROM:<>``, ``RCPT TO:<address>``, then RSET
and QUIT — no message is ever sent. A 2xx is "exists" (kept `ttl`), a 5xx
"unknown" (kept `negative_ttl`); anything else — a 4xx, a refused MAIL, a
connection failure, the `timeout` — is "tempfail" and is not kept, so the
listener answers 4xx and the client retries. Concurrent checks of one
address share one probe; the cache is an LRU of at most `max_entries`
addresses, compared case-insensitively (DESIGN.md: the local part too).

Trusts the downstream's answers (it is ours) but bounds them: every
exchange has the deadline `timeout`. STARTTLS is not used for probes: no
data crosses, only an address the client already sent us in the clear.

Standards: RFC 5321 §3.5 and §7.3 (address verification by RCPT), RFC
2033 (LMTP), RFC 6531 (SMTPUTF8 for non-ASCII addresses).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import aiosmtplib

from kithmail.queue.lmtp import LmtpClient, LmtpError
from kithmail.queue.transports import one_line, parse_target

__all__ = ["Answer", "CallAhead"]

log = logging.getLogger("kithmail.queue.callahead")

Answer = Literal["exists", "unknown", "tempfail"]


class CallAhead:
    """Cached RCPT probes to one smtp:// or lmtp:// downstream; see the module docstring."""

    def __init__(
        self,
        downstream: str,
        *,
        hostname: str,
        ttl: float,
        negative_ttl: float,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
    ) -> None:
        target = parse_target(downstream)
        if target.scheme not in ("smtp", "lmtp"):
            raise ValueError(
                f"call-ahead needs an smtp:// or lmtp:// downstream, not {downstream!r}"
            )
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.target = target
        self.hostname = hostname
        self.ttl, self.negative_ttl, self.timeout = ttl, negative_ttl, timeout
        self.max_entries = max_entries
        self._clock = clock
        self._cache: OrderedDict[str, tuple[Answer, float]] = OrderedDict()
        self._probes: dict[str, asyncio.Task[tuple[Answer, str]]] = {}
        self.probes = 0  # probes started, for tests and stats

    async def check(self, address: str) -> Answer:
        """Whether the downstream takes mail for `address`: exists, unknown or tempfail."""
        key = address.lower()
        hit = self._cache.get(key)
        if hit is not None:
            answer, until = hit
            if self._clock() < until:
                self._cache.move_to_end(key)
                return answer
            del self._cache[key]
        task = self._probes.get(key)
        if task is None:
            self.probes += 1
            task = asyncio.create_task(self._probe(address), name="kithmail-callahead")
            self._probes[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        # shield: one caller giving up (its client hung up) does not cancel
        # the probe the others wait for.
        answer, _ = await asyncio.shield(task)
        return answer

    def _done(self, key: str, task: asyncio.Task[tuple[Answer, str]]) -> None:
        if self._probes.get(key) is task:
            del self._probes[key]
        if task.cancelled() or task.exception() is not None:
            return
        answer, _ = task.result()
        if answer == "tempfail":
            return
        ttl = self.ttl if answer == "exists" else self.negative_ttl
        self._cache[key] = (answer, self._clock() + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    async def _probe(self, address: str) -> tuple[Answer, str]:
        try:
            async with asyncio.timeout(self.timeout):
                if self.target.scheme == "lmtp":
                    code, text = await self._probe_lmtp(address)
                else:
                    code, text = await self._probe_smtp(address)
        except TimeoutError:
            code, text = 0, f"no answer within {self.timeout:g}s"
        except (aiosmtplib.SMTPException, LmtpError, OSError, ValueError) as e:
            code, text = 0, one_line(str(e)) or type(e).__name__
        answer: Answer = (
            "exists" if 200 <= code < 300 else "unknown" if 500 <= code < 600 else "tempfail"
        )
        log.info("callahead rcpt=%s answer=%s reply=%r", one_line(address), answer, text)
        return answer, text

    async def _probe_smtp(self, address: str) -> tuple[int, str]:
        smtp = aiosmtplib.SMTP(
            hostname=self.target.host,
            port=self.target.port,
            local_hostname=self.hostname,
            timeout=self.timeout,
            start_tls=False,
        )
        try:
            await smtp.connect()
            await smtp.ehlo()
            utf8 = not address.isascii()
            if utf8 and not smtp.supports_extension("smtputf8"):
                return 0, "the downstream does not offer SMTPUTF8"
            try:
                await smtp.mail("", options=["SMTPUTF8"] if utf8 else [])
            except aiosmtplib.SMTPResponseException as e:
                return 0, f"MAIL refused: {e.code} {e.message}"  # not the address's fault
            try:
                reply = await smtp.rcpt(address, encoding="utf-8" if utf8 else "ascii")
                code, text = reply.code, reply.message
            except aiosmtplib.SMTPResponseException as e:
                code, text = e.code, e.message
            await smtp.rset()
            await smtp.quit()
            return code, f"{code} {text}"
        finally:
            smtp.close()

    async def _probe_lmtp(self, address: str) -> tuple[int, str]:
        client = LmtpClient(self.target.host, self.target.port, timeout=self.timeout)
        try:
            hello = await client.connect(self.hostname)
            if not hello.ok:
                return 0, f"LHLO refused: {hello}"
            utf8 = not address.isascii()
            if utf8 and not client.supports("SMTPUTF8"):
                return 0, "the downstream does not offer SMTPUTF8"
            mail = await client.mail("", ["SMTPUTF8"] if utf8 else [])
            if not mail.ok:
                return 0, f"MAIL refused: {mail}"
            reply = await client.rcpt(address)
            await client.rset()
            await client.quit()
            return reply.code, str(reply)
        finally:
            await client.close()
