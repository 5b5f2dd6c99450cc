"""Transports: how one message reaches one destination, with a result per recipient.

`maildir:DIR` writes ``DIR/<domain>/<mailbox>/new/<unique name>`` (the
mailbox is the local part lowercased, a ``+tag`` removed); `smtp://` talks
to a downstream server or smarthost through aiosmtplib; `lmtp://` through
`kithmail.queue.lmtp`; ``mx`` looks the recipient domain's MX records up
and talks SMTP to port 25 of each host in preference order, falling back
to the domain's own address when it has no MX (RFC 5321 §5.1). All the
recipients of one message for one destination share one transaction, and
each gets its own `Result` from its own RCPT reply and, for LMTP, its own
reply after DATA.

TLS: STARTTLS is used whenever the server offers it, **without certificate
verification**, downstream and outbound alike: opportunistic TLS (RFC
7435) protects against a passive listener, not an active one, which is
what port-25 MTAs do in practice. A failed handshake defers the attempt.

Trusts: the spool's data (checksummed) and the routing config. Nothing
from a recipient address names a path before it is checked (no "/", no
leading dot, no control character); reply texts from servers are kept to
one line. The message goes out exactly as spooled (CRLF lines); the
maildir copy has LF line ends, as Maildir readers expect.

Standards: RFC 5321 (SMTP; §5.1 MX and implicit MX, §4.2 replies), RFC
3207 (STARTTLS), RFC 6531 (SMTPUTF8), RFC 6152 (8BITMIME), RFC 2033 (LMTP),
RFC 7505 (null MX), RFC 3463 (the enhanced codes of our own replies), the
Maildir format (cr.yp.to/proto/maildir.html).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import aiosmtplib

from kithmail.dns import Resolver, Status
from kithmail.queue.lmtp import LmtpClient, LmtpError
from kithmail.spool import RecipientStatus, SpooledMessage, State

__all__ = [
    "Job",
    "Result",
    "Target",
    "deliver",
    "fold_domain",
    "mailbox_name",
    "parse_target",
]

READ_SIZE = 256 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str, limit: int = 500) -> str:
    """Text from a server or an exception, safe for a state record, log or header."""
    return _CONTROL.sub(" ", text).strip()[:limit]


@dataclass(frozen=True, slots=True)
class Result:
    """How one recipient's attempt ended: DELIVERED, DEFERRED or BOUNCED."""

    state: State
    reply: str  # the server's reply ("250 2.0.0 Ok"), or ours in the same form
    relay: str  # "127.0.0.1:2525", "mx.example.org[192.0.2.1]:25", "maildir"

    @property
    def status(self) -> str:
        """The enhanced status code (RFC 3463) in the reply, or one for its class."""
        m = re.match(r"\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b", self.reply)
        if m:
            return m.group(1)
        return {State.DELIVERED: "2.0.0", State.DEFERRED: "4.0.0"}.get(self.state, "5.0.0")


def _from_code(code: int, text: str, relay: str) -> Result:
    reply = one_line(f"{code} {text}")
    if 200 <= code < 300:
        return Result(State.DELIVERED, reply, relay)
    if 500 <= code < 600:
        return Result(State.BOUNCED, reply, relay)
    return Result(State.DEFERRED, reply, relay)


def deferred(reply: str, relay: str) -> Result:
    return Result(State.DEFERRED, one_line(reply), relay)


def bounced(reply: str, relay: str) -> Result:
    return Result(State.BOUNCED, one_line(reply), relay)


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed destination: maildir:DIR, smtp://H:P, lmtp://H:P or mx."""

    scheme: Literal["maildir", "smtp", "lmtp", "mx"]
    host: str = ""
    port: int = 0
    path: Path | None = None

    def __str__(self) -> str:
        if self.scheme == "maildir":
            return f"maildir:{self.path}"
        if self.scheme == "mx":
            return "mx"
        return f"{self.scheme}://{_hostport(self.host, self.port)}"


def parse_target(spec: str) -> Target:
    """`[domains] downstream` or `outbound` as a Target; ValueError if neither."""
    if spec == "mx":
        return Target("mx")
    if spec.startswith("maildir:") and len(spec) > len("maildir:"):
        return Target("maildir", path=Path(spec[len("maildir:") :]))
    u = urlsplit(spec)
    if u.scheme in ("smtp", "lmtp") and u.hostname and u.port is not None:
        return Target("smtp" if u.scheme == "smtp" else "lmtp", u.hostname, u.port)
    raise ValueError(f"not a destination: {spec!r} (maildir:DIR, smtp://H:P, lmtp://H:P, mx)")


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def fold_domain(domain: str) -> str:
    """A domain as the config spells local domains: lower case, A-labels, no final dot."""
    d = domain.strip().rstrip(".").lower()
    try:
        return d.encode("idna").decode("ascii")
    except UnicodeError:
        return d


def split_address(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    return (local, domain) if at else (address, "")


def mailbox_name(local_part: str) -> str | None:
    """The mailbox directory of a local part, or None if it cannot name one safely."""
    name = local_part.split("+", 1)[0].lower() if not local_part.startswith("+") else ""
    if (
        not name
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or _CONTROL.search(name)
        or len(name.encode("utf-8", "surrogateescape")) > 200
    ):
        return None
    return name


@dataclass
class Job:
    """One message's recipients for one destination, and their results as they come."""

    message: SpooledMessage
    recipients: Sequence[RecipientStatus]
    hostname: str  # our name: EHLO/LHLO, maildir file names
    timeout: float  # each network read or write
    results: dict[int, Result] = field(default_factory=dict)
    relay: str = ""  # where the last try went, for results filled in later

    def settle(self, result: Result) -> None:
        """Every recipient without a result yet gets `result`."""
        for r in self.recipients:
            self.results.setdefault(r.index, result)


async def deliver(
    target: Target, job: Job, *, resolver: Resolver | None = None, mx_port: int = 25
) -> None:
    """Run `job` against `target`, filling `job.results` (possibly not for everyone
    if it is cancelled or times out: the caller defers the rest)."""
    if target.scheme == "maildir":
        assert target.path is not None
        await _deliver_maildir(target.path, job)
    elif target.scheme == "smtp":
        try:
            await _deliver_smtp(target.host, target.port, job, target.host)
        except _SessionFailed as e:
            job.settle(_refused_session(e.reply, job.relay))
    elif target.scheme == "lmtp":
        await _deliver_lmtp(target.host, target.port, job)
    else:
        await _deliver_mx(job, resolver, mx_port)


# ---------------------------------------------------------------- maildir

_counter = itertools.count()


def _unique_name(hostname: str) -> str:
    # Maildir: seconds, then M<microseconds> P<pid> Q<delivery counter>
    # R<random> and the host name with "/" and ":" escaped as the spec says.
    now = time.time()
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    return (
        f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_counter)}"
        f"R{secrets.token_hex(8)}.{host}"
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_maildir(box: Path) -> None:
    if (box / "new").is_dir() and (box / "tmp").is_dir() and (box / "cur").is_dir():
        return
    made: list[Path] = []
    for d in (box.parent.parent, box.parent, box, box / "tmp", box / "new", box / "cur"):
        if not d.is_dir():
            d.mkdir(mode=0o700, exist_ok=True)
            made.append(d)
    for d in made:
        _fsync_dir(d.parent)


def _write_maildir(box: Path, head: bytes, message: SpooledMessage, hostname: str) -> Path:
    """Write one copy: tmp/, fsync, link into new/, fsync new/ (blocks: run in a thread)."""
    _make_maildir(box)
    name = _unique_name(hostname)
    tmp, new = box / "tmp" / name, box / "new" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            _write_all(fd, head)
            carry = b""
            for chunk in message.chunks(READ_SIZE):
                chunk = carry + chunk
                # A CR at the end may be half of a CRLF split between chunks.
                carry = b"\r" if chunk.endswith(b"\r") else b""
                if carry:
                    chunk = chunk[:-1]
                _write_all(fd, chunk.replace(b"\r\n", b"\n"))
            _write_all(fd, carry)
            os.fsync(fd)
        finally:
            os.close(fd)
        # link, not rename: a name that exists already fails instead of
        # being replaced (the Maildir spec's rule).
        os.link(tmp, new)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(box / "new")
    return new


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _header_value(text: str) -> bytes:
    return _CONTROL.sub("", text).encode("utf-8", "surrogateescape")


async def _deliver_maildir(root: Path, job: Job) -> None:
    job.relay = "maildir"
    sender = job.message.envelope.mail_from
    for r in job.recipients:
        local, domain = split_address(r.recipient.address)
        name = mailbox_name(local)
        folded = fold_domain(domain)
        if name is None or not folded or "/" in folded or folded.startswith("."):
            job.results[r.index] = bounced("550 5.1.3 no mailbox can have that name", "maildir")
            continue
        head = (
            b"Return-Path: <"
            + _header_value(sender)
            + b">\r\nDelivered-To: "
            + _header_value(r.recipient.address)
            + b"\r\n"
        ).replace(b"\r\n", b"\n")
        box = root / folded / name
        try:
            path = await asyncio.to_thread(_write_maildir, box, head, job.message, job.hostname)
        except OSError as e:
            why = e.strerror or str(e)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                job.results[r.index] = deferred(f"452 4.2.2 maildir {box}: {why}", "maildir")
            else:
                job.results[r.index] = deferred(f"451 4.3.0 maildir {box}: {why}", "maildir")
            continue
        job.results[r.index] = Result(
            State.DELIVERED, f"250 2.0.0 delivered to maildir as {path.name}", "maildir"
        )


# ---------------------------------------------------------------- SMTP


def _refused_session(reply: str, relay: str) -> Result:
    """A session that ended before any recipient was answered: always a deferral.

    Even a 5xx greeting: the next attempt (or the next MX) may fare better,
    and [queue] lifetime bounds the wait.
    """
    if reply.startswith("4"):
        return deferred(reply, relay)
    return deferred(f"451 4.4.0 {relay} refused the session: {reply}", relay)


class _SessionFailed(Exception):
    """No recipient was answered: another host of the MX list may be tried."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def _needs_utf8(job: Job, r: RecipientStatus) -> bool:
    return not (job.message.envelope.mail_from.isascii() and r.recipient.address.isascii())


def _mail_options(job: Job, supports: dict[str, bool]) -> list[str]:
    out = []
    for opt in job.message.envelope.mail_options:
        key = opt.split("=", 1)[0].upper()
        # An extension the server does not offer is not named to it; an
        # 8-bit body still goes as is (RFC 6152 §3 would have us convert;
        # like most MTAs we do not), SMTPUTF8 addresses are refused below.
        if key == "SMTPUTF8" and supports["smtputf8"]:
            out.append("SMTPUTF8")
        elif key == "BODY" and supports["8bitmime"]:
            out.append(opt.upper())
    return out


async def _deliver_smtp(host: str, port: int, job: Job, name: str) -> None:
    """One SMTP transaction with `host` (an IP or a name) for every recipient of the job.

    Raises `_SessionFailed` when it broke before any recipient was answered.
    """
    relay = _hostport(host, port) if name == host else f"{name}[{host}]:{port}"
    job.relay = relay
    smtp = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        local_hostname=job.hostname,
        timeout=job.timeout,
        start_tls=False,
        validate_certs=False,
    )
    answered = False
    try:
        try:
            await smtp.connect()
            await smtp.ehlo()
            if smtp.supports_extension("starttls"):
                # Opportunistic and unverified on purpose: see the module docstring.
                await smtp.starttls(validate_certs=False, server_hostname=name)
                await smtp.ehlo()
        except aiosmtplib.SMTPResponseException as e:
            raise _SessionFailed(one_line(f"{e.code} {e.message}")) from None
        except (aiosmtplib.SMTPException, OSError) as e:
            raise _SessionFailed(
                f"451 4.4.1 {relay}: {one_line(str(e)) or type(e).__name__}"
            ) from None
        supports = {
            "smtputf8": smtp.supports_extension("smtputf8"),
            "8bitmime": smtp.supports_extension("8bitmime"),
        }
        options = _mail_options(job, supports)
        utf8 = "SMTPUTF8" in options
        sender = job.message.envelope.mail_from
        if not sender.isascii() and not utf8:
            job.settle(bounced(f"553 5.6.7 {relay} does not offer SMTPUTF8", relay))
            answered = True
            return
        try:
            await smtp.mail(sender, options=options, encoding="utf-8" if utf8 else "ascii")
        except aiosmtplib.SMTPResponseException as e:
            job.settle(_from_code(e.code, e.message, relay))
            answered = True
            return
        accepted: list[RecipientStatus] = []
        for r in job.recipients:
            if _needs_utf8(job, r) and not utf8:
                job.results[r.index] = bounced(f"553 5.6.7 {relay} does not offer SMTPUTF8", relay)
                continue
            try:
                await smtp.rcpt(r.recipient.address, encoding="utf-8" if utf8 else "ascii")
            except aiosmtplib.SMTPResponseException as e:
                job.results[r.index] = _from_code(e.code, e.message, relay)
                answered = True
                continue
            answered = True
            accepted.append(r)
        if not accepted:
            return
        # aiosmtplib's data() takes the message whole: this reads it into
        # memory (up to [limits] max_message_size per attempt in flight).
        # The LMTP client streams instead.
        data = await asyncio.to_thread(job.message.read_bytes)
        try:
            reply = await smtp.data(data)
        except aiosmtplib.SMTPResponseException as e:
            result = _from_code(e.code, e.message, relay)
        else:
            result = _from_code(reply.code, reply.message, relay)
        for r in accepted:
            job.results[r.index] = result
    except (aiosmtplib.SMTPException, OSError) as e:
        failure = f"451 4.4.2 {relay}: {one_line(str(e)) or type(e).__name__}"
        if not answered:
            raise _SessionFailed(failure) from None
        job.settle(deferred(failure, relay))
    finally:
        await _close_smtp(smtp)


async def _close_smtp(smtp: aiosmtplib.SMTP) -> None:
    try:
        if smtp.is_connected:
            await smtp.quit()
    except (aiosmtplib.SMTPException, OSError):
        pass
    finally:
        # Also after a cancellation mid-connect, when aiosmtplib may not
        # count itself connected yet but holds a transport.
        smtp.close()


# ---------------------------------------------------------------- LMTP


async def spool_chunks(message: SpooledMessage, size: int = READ_SIZE) -> AsyncIterator[bytes]:
    """The message data in chunks, each read in a thread (the loop never waits on disk)."""
    f = await asyncio.to_thread(message.open)
    try:
        while chunk := await asyncio.to_thread(f.read, size):
            yield chunk
    finally:
        f.close()


async def _deliver_lmtp(host: str, port: int, job: Job) -> None:
    relay = _hostport(host, port)
    job.relay = relay
    client = LmtpClient(host, port, timeout=job.timeout)
    try:
        hello = await client.connect(job.hostname)
        if not hello.ok:
            job.settle(_refused_session(str(hello), relay))
            return
        utf8 = client.supports("SMTPUTF8")
        options = _mail_options(job, {"smtputf8": utf8, "8bitmime": client.supports("8BITMIME")})
        sender = job.message.envelope.mail_from
        if not sender.isascii() and "SMTPUTF8" not in options:
            job.settle(bounced(f"553 5.6.7 {relay} does not offer SMTPUTF8", relay))
            return
        reply = await client.mail(sender, options)
        if not reply.ok:
            job.settle(_from_code(reply.code, reply.text, relay))
            return
        accepted: list[RecipientStatus] = []
        for r in job.recipients:
            if _needs_utf8(job, r) and "SMTPUTF8" not in options:
                job.results[r.index] = bounced(f"553 5.6.7 {relay} does not offer SMTPUTF8", relay)
                continue
            reply = await client.rcpt(r.recipient.address)
            if reply.ok:
                accepted.append(r)
            else:
                job.results[r.index] = _from_code(reply.code, reply.text, relay)
        if not accepted:
            await client.rset()
            return
        replies = await client.data(spool_chunks(job.message), len(accepted))
        for r, reply in zip(accepted, replies, strict=True):
            job.results[r.index] = _from_code(reply.code, reply.text, relay)
        await client.quit()
    except LmtpError as e:
        job.settle(deferred(f"451 4.4.2 {one_line(str(e))}", relay))
    finally:
        await client.close()


# ---------------------------------------------------------------- MX


async def _addresses(resolver: Resolver, host: str) -> tuple[list[str], Status]:
    out: list[str] = []
    worst = Status.NXDOMAIN
    for lookup in (resolver.a, resolver.aaaa):
        r = await lookup(host)
        if r.ok:
            out.extend(r.records)
            worst = Status.ANSWER
        elif r.temporary or r.status is Status.MALFORMED:
            worst = r.status if worst is not Status.ANSWER else worst
        elif r.status is Status.NODATA and worst is Status.NXDOMAIN:
            worst = Status.NODATA
    return out, worst


async def _deliver_mx(job: Job, resolver: Resolver | None, port: int) -> None:
    domain = fold_domain(split_address(job.recipients[0].recipient.address)[1])
    relay = f"mx:{domain}"
    job.relay = relay
    if resolver is None:
        job.settle(deferred("451 4.3.5 no DNS resolver configured for MX delivery", relay))
        return
    mx = await resolver.mx(domain)
    implicit = False
    if mx.ok:
        if len(mx.records) == 1 and mx.records[0].host == ".":
            job.settle(bounced(f"556 5.1.10 {domain} accepts no mail (null MX)", relay))
            return
        hosts = [m.host for m in mx.records if m.host != "."]
    elif mx.status is Status.NXDOMAIN:
        job.settle(bounced(f"550 5.1.2 {domain}: no such domain", relay))
        return
    elif mx.status is Status.NODATA:
        hosts, implicit = [domain], True  # RFC 5321 §5.1: the domain is its own MX
    else:
        job.settle(deferred(f"451 4.4.3 MX lookup for {domain}: {mx.detail}", relay))
        return
    last = f"451 4.4.3 no address for the MX hosts of {domain}"
    tried = False
    for host in hosts:
        addrs, status = await _addresses(resolver, host)
        if not addrs:
            if implicit and status in (Status.NXDOMAIN, Status.NODATA):
                job.settle(bounced(f"550 5.1.2 {domain}: no MX and no address", relay))
                return
            continue
        for ip in addrs:
            tried = True
            try:
                await _deliver_smtp(ip, port, job, host)
                return
            except _SessionFailed as e:
                last = e.reply
    job.settle(_refused_session(last, job.relay if tried else relay))
