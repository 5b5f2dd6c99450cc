"""Layer 4, anti-virus: clamd scans the whole message, as received.

At end of DATA the message — header, body, every MIME part, archives
inside them — is streamed to clamd, which decodes the MIME itself, and its
answer becomes a `Verdict`: clean → accept (`antivirus.clean`); a signature
→ `[antivirus] on_virus` (`antivirus.virus`, the signature name in the
detail and in the SMTP reply); an archive clamd could not fully scan
(encrypted, over its limits: clamd reports these as `Heuristics.Encrypted.*`
and `Heuristics.Limits.Exceeded*` when run with `AlertEncrypted yes` and
`AlertExceedsMax yes`) → `on_unscannable`, or `on_virus` when unset
(`antivirus.unscannable`); a clamd that is down, slower than `timeout` or
answers anything this module does not understand → `on_error`
(`antivirus.error`), never clean; a message over `max_size` is not sent at
all → `on_oversize` (`antivirus.oversize`). No clamd configured → the layer
is off (`antivirus.off`). In shadow mode every decision is recorded, none
enforced.

One connection per scan: clamd serves each connection from its own thread
and a local connect costs far less than the scan, so there is no pool to
go stale across clamd restarts. `timeout` bounds the whole exchange,
connect to last byte. The age of clamd's signatures, from its VERSION
reply, is exported as `kithmail_antivirus_signatures_age_seconds`, asked at
most every `VERSION_INTERVAL` seconds (lazily after a scan, or when the
server calls `refresh_version`); the gauge is absent until a reply could be
read, so "unknown" never looks like "fresh".

Trusts: nothing of the message (it is hostile and goes to clamd as bytes,
never parsed here); clamd's reply only as far as it parses strictly — a
signature name is reduced to printable ASCII of bounded length before it
reaches a reply, a log or a detail, and is never a metric label.

Protocol: clamd's INSTREAM (clamd(8), "zINSTREAM": NUL-terminated command,
then chunks each preceded by its length as 4 bytes big-endian, a
zero-length chunk to end; the reply is NUL-terminated), over a unix socket
or TCP; VERSION the same way.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from kithmail import config
from kithmail.layers import Action, Layer, SmtpReply, Verdict

if TYPE_CHECKING:
    from kithmail.pipeline import MessageContext

__all__ = [
    "RESULTS",
    "VERSION_INTERVAL",
    "Antivirus",
    "ClamdError",
    "ScanResult",
    "parse_reply",
    "parse_version",
]

log = logging.getLogger("kithmail.antivirus")

# Bytes per INSTREAM chunk: large enough that the 4-byte headers cost
# nothing, small enough that one write never holds much beyond the message.
CHUNK = 64 * 1024
# clamd's answer is one short line (several only with AllMatchScan); more
# than this is not clamd.
REPLY_LIMIT = 8192
# How long the signature age read from VERSION is trusted before asking again.
VERSION_INTERVAL = 300.0
# The longest signature name passed on; official names are well under 80.
NAME_LIMIT = 100

RESULTS = ("clean", "virus", "unscannable", "error", "oversize")
ScanKind = Literal["clean", "virus", "unscannable"]

# Names clamd gives to what it could not look inside, rather than to
# something it found there (AlertEncrypted*, AlertExceedsMax).
_UNSCANNABLE = ("Heuristics.Encrypted.", "Heuristics.Limits.Exceeded")
_SIZE_LIMIT = "INSTREAM size limit exceeded. ERROR"
_VERSION = re.compile(r"ClamAV [0-9][0-9A-Za-z.+~-]*/([0-9]+)/([^/]+)")
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ClamdError(Exception):
    """clamd gave no verdict: unreachable, too slow, refused, or not understood."""


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What clamd said about a stream it scanned: clean, or a (sanitised) name."""

    kind: ScanKind
    name: str = ""


def printable(text: str, limit: int = NAME_LIMIT) -> str:
    """`text` as printable ASCII without spaces, at most `limit` characters."""
    out = "".join(c if "!" <= c <= "~" else "?" for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def parse_reply(raw: bytes) -> ScanResult:
    """clamd's answer to zINSTREAM, parsed strictly; ClamdError unless clean or found.

    Each reply ends in NUL. "stream: OK" alone is clean; one or more
    "stream: NAME FOUND" (several only with AllMatchScan) name what was
    found, a real signature before an unscannable archive. Anything ending
    in " ERROR" is clamd refusing; anything else is garbage.
    """
    if not raw.endswith(b"\0"):
        raise ClamdError(f"clamd's answer is not NUL-terminated: {printable(repr(raw), 80)}")
    replies = raw[:-1].decode("latin-1").split("\0")
    if replies == ["stream: OK"]:
        return ScanResult("clean")
    if replies == [_SIZE_LIMIT]:
        raise ClamdError(
            "clamd refused the message: over its StreamMaxLength "
            "(keep [antivirus] max_size below it)"
        )
    names: list[str] = []
    for r in replies:
        if r.endswith(" ERROR"):
            raise ClamdError(f"clamd: {printable(r, 200)}")
        if not (r.startswith("stream: ") and r.endswith(" FOUND")):
            raise ClamdError(f"clamd's answer not understood: {printable(r, 80)}")
        name = r[len("stream: ") : -len(" FOUND")]
        if not name.strip():
            raise ClamdError("clamd's answer not understood: FOUND without a name")
        names.append(printable(name))
    real = [n for n in names if not n.startswith(_UNSCANNABLE)]
    if real:
        return ScanResult("virus", real[0])
    return ScanResult("unscannable", names[0])


def parse_version(raw: bytes) -> float | None:
    """The time of clamd's signatures, from its VERSION reply, or None.

    "ClamAV 1.4.6/27001/Sun Nov 22 14:08:17 2026": the part after the last
    slash is the daily database's build time, printed by clamd with ctime(3)
    in its local time zone; it is read here in ours (clamd and the gateway
    are assumed to share a zone, as hosts run in UTC). Without a daily
    database clamd answers "ClamAV 1.4.6" alone: None.
    """
    text = raw.rstrip(b"\0").decode("latin-1").strip()
    m = _VERSION.fullmatch(text)
    if m is None:
        return None
    try:
        return time.mktime(time.strptime(m.group(2).strip(), "%a %b %d %H:%M:%S %Y"))
    except (ValueError, OverflowError):
        return None


class _Collectors:
    """The anti-virus metrics of one registry, made once (several layers may share it)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.scans = Counter(
            "kithmail_antivirus_scans",
            "Anti-virus results: clean, virus, unscannable (an archive clamd could "
            "not fully scan), error (clamd down, slow or not understood), oversize "
            "(not sent).",
            ["result"],
            registry=registry,
        )
        for r in RESULTS:
            self.scans.labels(r)
        self.seconds = Histogram(
            "kithmail_antivirus_seconds",
            "Time of one clamd exchange, connect to verdict.",
            buckets=_SECONDS,
            registry=registry,
        )
        self._age: Gauge | None = None

    def age(self) -> Gauge:
        # Made on the first readable VERSION: absent means unknown.
        if self._age is None:
            self._age = Gauge(
                "kithmail_antivirus_signatures_age_seconds",
                "Age of clamd's signatures (its daily database), from its VERSION reply.",
                multiprocess_mode="livemax",
                registry=self.registry,
            )
        return self._age


_SHARED: dict[int, _Collectors] = {}


def _collectors(registry: CollectorRegistry) -> _Collectors:
    c = _SHARED.get(id(registry))
    if c is None:
        c = _SHARED[id(registry)] = _Collectors(registry)
    return c


async def _connect(clamd: str) -> socket.socket:
    loop = asyncio.get_running_loop()
    if clamd.startswith("unix:"):
        targets: list[tuple[int, str | tuple[str, int]]] = [(socket.AF_UNIX, clamd[len("unix:") :])]
    else:
        u = urlsplit(clamd)
        if u.scheme != "tcp" or not u.hostname or not u.port:
            raise ClamdError(f"not a clamd address: {clamd!r}")
        infos = await loop.getaddrinfo(u.hostname, u.port, type=socket.SOCK_STREAM)
        targets = [(family, (str(a[0]), int(a[1]))) for family, _, _, _, a in infos]
    error: OSError | None = None
    for family, address in targets:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            return sock
        except OSError as e:
            sock.close()
            error = e
        except BaseException:
            sock.close()
            raise
    raise ClamdError(f"cannot connect to clamd at {clamd}: {_why(error)}")


def _why(e: BaseException | None) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


async def _exchange(clamd: str, request: bytes, body: Sequence[bytes] | None) -> bytes:
    """Send one command (and, for INSTREAM, `body` in chunks); clamd's whole answer.

    No deadline here: the caller holds one for the whole exchange. A plain
    non-blocking socket rather than asyncio streams: when clamd refuses a
    stream it answers and closes while we are still sending, and a stream
    transport would drop that answer with the failed write; the kernel
    keeps it for the `recv` that follows.
    """
    loop = asyncio.get_running_loop()
    try:
        sock = await _connect(clamd)
    except OSError as e:  # getaddrinfo
        raise ClamdError(f"cannot connect to clamd at {clamd}: {_why(e)}") from e
    with sock:
        sent: OSError | None = None
        try:
            await loop.sock_sendall(sock, request)
            if body is not None:
                for chunk in _chunks(body):
                    await loop.sock_sendall(sock, chunk)
        except OSError as e:
            sent = e
        raw = bytearray()
        try:
            while len(raw) <= REPLY_LIMIT:
                got = await loop.sock_recv(sock, REPLY_LIMIT + 1 - len(raw))
                if not got:
                    break
                raw += got
        except OSError as e:
            if not raw:
                raise ClamdError(f"clamd at {clamd} hung up: {_why(e)}") from e
        if len(raw) > REPLY_LIMIT:
            raise ClamdError(f"clamd's answer is longer than {REPLY_LIMIT} bytes")
        if not raw:
            why = f" ({_why(sent)} while sending)" if sent is not None else ""
            raise ClamdError(f"clamd at {clamd} closed without an answer{why}")
        return bytes(raw)


def _chunks(body: Sequence[bytes]) -> Iterator[bytes]:
    """INSTREAM chunks of `body`: each CHUNK bytes at most, length first; then the end."""
    buf = bytearray()
    for line in body:
        buf += line
        while len(buf) >= CHUNK:
            yield struct.pack(">I", CHUNK) + buf[:CHUNK]
            del buf[:CHUNK]
    if buf:
        yield struct.pack(">I", len(buf)) + buf
    yield b"\0\0\0\0"


def _reply(action: Action, text: str) -> SmtpReply | None:
    if action is Action.REJECT:
        return SmtpReply(554, "5.7.0", text)
    if action is Action.DEFER:
        return SmtpReply(451, "4.7.0", f"{text}, try again later")
    return None


class Antivirus:
    """The anti-virus layer: `await layer(ctx)` → a `Verdict` (see the module)."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry = REGISTRY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = _collectors(registry)
        self._clock = clock
        # Per clamd address: when to ask VERSION next (monotonic), and the
        # signatures' time from its last readable answer.
        self._version_due: dict[str, float] = {}
        self._signatures: dict[str, float] = {}

    async def __call__(self, ctx: MessageContext) -> Verdict:
        av = ctx.policy.settings.antivirus
        if av.clamd is None:
            return Verdict(Layer.ANTIVIRUS, Action.ACCEPT, "antivirus.off")
        size = sum(len(line) for line in ctx.data)
        if size > av.max_size:
            self._metrics.scans.labels("oversize").inc()
            return self._decide(
                av,
                Action(av.on_oversize),
                "antivirus.oversize",
                f"{size} bytes, over max_size {av.max_size}: not scanned",
                text="Message too large to scan for viruses",
            )
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(av.timeout):
                raw = await _exchange(av.clamd, b"zINSTREAM\0", ctx.data)
            result = parse_reply(raw)
        except TimeoutError:
            return self._error(av, t0, f"no answer from clamd at {av.clamd} within {av.timeout}s")
        except ClamdError as e:
            return self._error(av, t0, str(e))
        self._metrics.seconds.observe(time.perf_counter() - t0)
        self._metrics.scans.labels(result.kind).inc()
        await self._maybe_refresh(av)
        if result.kind == "clean":
            return Verdict(Layer.ANTIVIRUS, Action.ACCEPT, "antivirus.clean", f"{size} bytes")
        if result.kind == "virus":
            log.info("antivirus: virus %s in a message from %s", result.name, ctx.client_ip)
            return self._decide(
                av,
                Action(av.on_virus),
                "antivirus.virus",
                f"signature {result.name}",
                text=f"Virus found: {result.name}",
            )
        log.info("antivirus: unscannable (%s) in a message from %s", result.name, ctx.client_ip)
        return self._decide(
            av,
            Action(av.on_unscannable or av.on_virus),
            "antivirus.unscannable",
            f"not fully scanned: {result.name}",
            text=f"Attachment could not be scanned: {result.name}",
        )

    async def refresh_version(self, av: config.Antivirus) -> float | None:
        """Ask clamd its VERSION; set the signature-age gauge; the signatures' time.

        For the server to call periodically (scans also ask, lazily, at
        most every `VERSION_INTERVAL`). None, and a log line, when clamd is
        off, unreachable or its answer carries no readable date; the gauge
        then keeps its last value (a stale database stays visible).
        """
        if av.clamd is None:
            return None
        self._version_due[av.clamd] = time.monotonic() + VERSION_INTERVAL
        try:
            async with asyncio.timeout(av.timeout):
                raw = await _exchange(av.clamd, b"zVERSION\0", None)
        except TimeoutError:
            log.warning("antivirus: clamd at %s did not answer VERSION in time", av.clamd)
            return None
        except ClamdError as e:
            log.warning("antivirus: VERSION: %s", e)
            return None
        when = parse_version(raw)
        if when is None:
            log.warning(
                "antivirus: clamd at %s gave no signature date in its VERSION reply %r "
                "(no daily database?); signature age unknown",
                av.clamd,
                printable(raw.rstrip(b"\0").decode("latin-1"), 120),
            )
            return None
        self._signatures[av.clamd] = when
        self._set_age()
        return when

    async def _maybe_refresh(self, av: config.Antivirus) -> None:
        assert av.clamd is not None
        if time.monotonic() >= self._version_due.get(av.clamd, 0.0):
            await self.refresh_version(av)
        elif self._signatures:
            self._set_age()

    def _set_age(self) -> None:
        # The stalest database among the clamds in use is the one to alert on.
        oldest = min(self._signatures.values())
        self._metrics.age().set(max(0.0, self._clock() - oldest))

    def _error(self, av: config.Antivirus, t0: float, detail: str) -> Verdict:
        self._metrics.seconds.observe(time.perf_counter() - t0)
        self._metrics.scans.labels("error").inc()
        log.warning("antivirus: %s", detail)
        return self._decide(
            av,
            Action(av.on_error),
            "antivirus.error",
            detail,
            text="Virus scan not available",
        )

    @staticmethod
    def _decide(
        av: config.Antivirus, action: Action, reason: str, detail: str, *, text: str
    ) -> Verdict:
        v = Verdict(Layer.ANTIVIRUS, action, reason, detail, _reply(action, text))
        if av.mode == "shadow" and action is not Action.ACCEPT:
            return v.in_shadow()
        return v
