"""Delivery Status Notifications: the bounce a sender gets for mail that failed for good.

`should_notify` says whether a failed recipient earns a DSN at all: never
for the null sender (a DSN of a DSN, a SAV challenge), never when the
recipient's verdicts say SPF failed or softfailed for the sender (the
sender is likely forged, and the DSN would be backscatter). `compose`
builds one DSN for the failed recipients of one message: a
multipart/report with a human part, a message/delivery-status part and
the original's header block only, as text/rfc822-headers — never its body.

Trusts nothing of the original: every envelope string that reaches a
header or a status field loses its control characters (no CR/LF
injection); non-ASCII addresses go into status fields as RFC 6533
utf-8-addr-xtext; the original's header block is cut at `MAX_HEADERS`
bytes on a line boundary and sits in a part of its own under a random
boundary that it cannot contain.

Standards: RFC 3464 (DSN format), RFC 6522 (multipart/report), RFC 3462
(text/rfc822-headers), RFC 3834 (Auto-Submitted), RFC 3463 (status
codes), RFC 6533 (internationalised addresses in DSNs), RFC 5322 (Date,
Message-ID).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate

from kithmail.spool import Envelope, Outcome, Recipient, RecipientStatus, SpooledMessage

__all__ = ["MAX_HEADERS", "NO_DSN_REASONS", "Failure", "compose", "envelope_for", "should_notify"]

MAX_HEADERS = 64 * 1024
NO_DSN_REASONS = frozenset({"spf.fail", "spf.softfail"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient that failed for good, and why."""

    recipient: RecipientStatus
    status: str  # RFC 3463, "5.1.1"
    diagnostic: str  # the remote reply, or our own words
    remote_mta: str = ""  # host name or address of the server that said so
    expired: bool = False


def should_notify(envelope: Envelope, recipient: Recipient) -> bool:
    """Whether a permanent failure of `recipient` is reported to the sender."""
    if not envelope.mail_from:
        return False
    return not any(r in NO_DSN_REASONS for r in recipient.reasons)


def clean(text: str, limit: int = 998) -> str:
    """One header-safe line: control characters out, length capped."""
    return _CONTROL.sub("", text)[:limit]


def xtext_address(address: str) -> tuple[str, str]:
    """(address type, address) for a status field: rfc822 if ASCII, else utf-8 xtext."""
    a = clean(address, 400)
    if a.isascii():
        return "rfc822", a
    # RFC 6533 §3: utf-8-addr-xtext, non-ASCII as \\x{HEX}; a backslash too.
    out = "".join(c if c.isascii() and c != "\\" else f"\\x{{{ord(c):X}}}" for c in a)
    return "utf-8", out


def header_block(message: SpooledMessage) -> bytes:
    """The original's header block, up to the blank line, at most MAX_HEADERS bytes."""
    got = b""
    with message.open() as f:
        while len(got) < MAX_HEADERS + 4:
            chunk = f.read(16384)
            if not chunk:
                break
            got += chunk
            end = got.find(b"\r\n\r\n")
            if end >= 0:
                return got[: end + 2]
    block = got[:MAX_HEADERS]
    cut = block.rfind(b"\r\n")
    return block[: cut + 2] if cut >= 0 else b""


def compose(
    *,
    hostname: str,
    message: SpooledMessage,
    failures: Sequence[Failure],
    headers: bytes,
    now: float,
) -> bytes:
    """The DSN for `failures` of `message`, as CRLF-terminated bytes.

    `headers` is `header_block(message)` (read by the caller in a thread).
    """
    if not failures:
        raise ValueError("a DSN reports at least one failed recipient")
    env = message.envelope
    host = clean(hostname, 255) or "localhost"
    boundary = f"=_kithmail_dsn_{secrets.token_hex(16)}"
    # The boundary must not occur in any part; the random part makes that
    # practically certain, the check makes it certain.
    while boundary.encode() in headers:
        boundary = f"=_kithmail_dsn_{secrets.token_hex(16)}"
    date = formatdate(now, usegmt=True)
    sender = clean(env.mail_from, 400)
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {date}",
        f"Message-ID: <{secrets.token_hex(12)}.dsn@{host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at {host}.",
        "",
        f"Your message (queue id {message.queue_id}) could not be delivered to",
        "the recipients below. The headers of your message are attached.",
        "",
    ]
    for f in failures:
        why = "it stayed undeliverable too long" if f.expired else "it was refused"
        lines.append(f"<{clean(f.recipient.recipient.address, 400)}>: {why}:")
        lines.append(f"    {clean(f.diagnostic, 900)}")
        lines.append("")
    lines += [
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {host}",
        f"X-Kithmail-Queue-ID: {message.queue_id}",
        f"Arrival-Date: {formatdate(env.received, usegmt=True)}",
    ]
    for f in failures:
        kind, addr = xtext_address(f.recipient.recipient.address)
        lines += ["", f"Final-Recipient: {kind}; {addr}", "Action: failed", f"Status: {f.status}"]
        if f.remote_mta:
            lines.append(f"Remote-MTA: dns; {clean(f.remote_mta, 255)}")
        if f.diagnostic:
            diag_type = "smtp" if re.match(r"[245]\d\d ", f.diagnostic) else "x-kithmail"
            lines.append(f"Diagnostic-Code: {diag_type}; {_ascii(clean(f.diagnostic, 900))}")
        lines.append(f"Last-Attempt-Date: {date}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        *(["Content-Transfer-Encoding: 8bit"] if not headers.isascii() else []),
        "",
        "",
    ]
    head = "\r\n".join(lines).encode("utf-8")
    return head + headers + f"\r\n--{boundary}--\r\n".encode()


def _ascii(text: str) -> str:
    # message/delivery-status is 7-bit: keep what a server said readable.
    return text.encode("ascii", "backslashreplace").decode("ascii")


def envelope_for(original: Envelope, *, now: float, hostname: str) -> Envelope:
    """The DSN's envelope: null sender, to the original sender, to be delivered."""
    options = () if original.mail_from.isascii() else ("SMTPUTF8",)
    return Envelope(
        received=now,
        client_ip="",  # made here, not received from anyone
        helo=hostname,
        mail_from="",
        recipients=(Recipient(original.mail_from, Outcome.DELIVER),),
        tenant=original.tenant,
        mail_options=(*options, "BODY=8BITMIME"),
    )
