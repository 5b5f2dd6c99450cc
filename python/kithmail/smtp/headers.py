"""Header work on raw message bytes: our trace header in, headers only we may write out.

Trusts nothing in the message: header fields are found by the RFC 5322
§2.2 rules (a field starts at a line not beginning with white space, and
runs through its folded continuation lines); a field name that is not
printable ASCII ends the header section's inspection at that point, as the
body would. Client strings (HELO, addresses) are escaped before they are
written into a header: no CR, LF, control characters or parentheses reach
it.

Standards: RFC 5321 §4.4 (the Received trace field), RFC 5322 §2.2 and
§3.6.7, RFC 8601 §5 (removing Authentication-Results that claim our
authserv-id), RFC 7208 §9.1 (Received-SPF).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable, Sequence

__all__ = ["clean", "received", "split_header", "strip_ours"]

_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_UNSAFE = re.compile(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e]")


def clean(value: str, limit: int = 200) -> str:
    """A client string made safe for a header comment: printable ASCII, no
    parentheses, backslashes or white space; cut at `limit` characters."""
    value = _UNSAFE.sub("?", value[:limit])
    return value or "?"


def received(
    *,
    helo: str,
    client_ip: str,
    client_name: str | None,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: Sequence[str],
    tls: str | None,
    when: float,
) -> bytes:
    """The Received field for one message (RFC 5321 §4.4), CRLF-terminated.

    `for <rcpt>` only when there is one recipient (it would disclose the
    others otherwise). `tls` is e.g. "TLSv1.3:TLS_AES_256_GCM_SHA384".
    """
    ip = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    name = f"{clean(client_name)} " if client_name else ""
    parts = [f"from {clean(helo)} ({name}[{ip}])", f"by {hostname} (kithmail)"]
    if tls:
        parts.append(f"({clean(tls)})")
    parts.append(f"with {protocol} id {queue_id}")
    if len(recipients) == 1:
        parts.append(f"for <{clean(recipients[0], 256)}>")
    date = email.utils.formatdate(when, localtime=False)
    return ("Received: " + "\r\n\t".join(parts) + f"; {date}\r\n").encode("ascii")


def split_header(lines: Sequence[bytes]) -> int:
    """The index of the first body line (just past the empty line), or len(lines)."""
    for i, line in enumerate(lines):
        if line == b"\r\n":
            return i + 1
        if line[:1] not in (b" ", b"\t") and not _NAME.match(line):
            return i  # not a header field: the body starts here (RFC 5322 §2.1)
    return len(lines)


_TOKEN = re.compile(rb'[^\s;()"]*')
_CFWS_LIMIT = 4096


def _authserv_id(value: bytes) -> bytes | None:
    """The authserv-id of an Authentication-Results value, lower-cased.

    RFC 8601 §2.2: it is the first item of the value, a token or a
    quoted-string, which folding white space and comments (CFWS, nested)
    may precede -- on a continuation line, behind "(a comment)", in
    quotes: every form a downstream parser reads as the same id. None when
    no id shows within the first `_CFWS_LIMIT` octets (the caller treats
    that as ours: dropping such a field is harmless, and the scan stays
    bounded however long a field is).
    """
    head = value[:_CFWS_LIMIT]
    depth = i = 0
    while True:
        if i >= len(head):
            return None
        c = head[i]
        if depth:
            if c == 0x5C:  # a quoted-pair: "\)" does not close the comment
                i += 1
            elif c == 0x28:  # (
                depth += 1
            elif c == 0x29:  # )
                depth -= 1
        elif c == 0x28:
            depth = 1
        elif c not in b" \t\r\n":
            break
        i += 1
    rest = value[i:]
    if rest[:1] == b'"':
        m = re.match(rb'"((?:[^"\\]|\\.)*)"', rest[:_CFWS_LIMIT])
        return None if m is None else re.sub(rb"\\(.)", rb"\1", m[1]).lower()
    m = _TOKEN.match(rest)
    return m[0].lower() if m else None


def _ours(name: bytes, value: bytes, authserv_id: bytes) -> bool:
    n = name.lower()
    if n.startswith(b"x-kithmail-") or n == b"received-spf":
        return True
    if n == b"authentication-results":
        found = _authserv_id(value)
        return found is None or found == authserv_id
    return False


def strip_ours(lines: Sequence[bytes], end: int, authserv_id: str) -> tuple[list[bytes], int]:
    """The header lines [0, end) without the fields only kithmail may write.

    A field is judged whole, its continuation lines included. Returns the
    kept lines and how many fields were removed.
    """
    sid = authserv_id.lower().encode("ascii")
    kept: list[bytes] = []
    removed = 0
    i = 0
    while i < end:
        j = i + 1
        while j < end and lines[j][:1] in (b" ", b"\t"):
            j += 1
        field = lines[i:j]
        m = _NAME.match(field[0])
        if m and _ours(m.group(1), b"".join(field)[m.end() :], sid):
            removed += 1
        else:
            kept.extend(field)
        i = j
    return kept, removed


def header_lines(fields: Iterable[tuple[str, str]]) -> list[bytes]:
    """Our own header fields, each value already made safe by the caller."""
    out = []
    for name, value in fields:
        if any(c in value for c in "\r\n") or any(c in name for c in "\r\n: "):
            raise ValueError(f"unsafe header {name!r}")
        out.append(f"{name}: {value}\r\n".encode())
    return out
