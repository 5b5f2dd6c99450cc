"""The SAV challenge: a short, plain, polite message asking a sender to confirm.

`compose` builds it as CRLF-terminated bytes: multipart/alternative with a
text/plain and a text/html part (both quoted-printable UTF-8), ``From`` an
address of the recipient's domain, ``Reply-To`` the token address
``sav+<token>@<domain>``, ``To`` the challenged sender, ``Auto-Submitted:
auto-replied``, a ``Message-ID``, a ``Date`` and, when the held message's
Message-ID is a well-formed one, ``In-Reply-To``/``References`` to it. It
names the recipient and the held message's subject and links to the
confirmation page; it never quotes the held message's body. The caller's
signer (`kithmail.dkimkeys.signer_for`) DKIM-signs the result.

Trusts nothing taken from the held message (subject, the sender's display
name, its Message-ID): encoded words in it are decoded first (to show what
its author wrote), then control and format characters (CR, LF, NUL, bidi
overrides) become spaces and the text is cut to a bounded length; a value
that is then not plain printable ASCII free of ``=?`` is written only as
RFC 2047 encoded words made by the email package (``email.header.Header``),
so no text of theirs can start a header, end one, or pass for an encoded
word of ours. In HTML everything is escaped. The addresses must be plain
``local@domain`` (`kithmail.db.fold_address`) with an ASCII local part.

Standards: RFC 3834 (Auto-Submitted, replies to the envelope sender),
RFC 5322 (fields), RFC 2045–2047 and RFC 2231 (MIME, encoded words),
RFC 2046 §5.1.4 (multipart/alternative), RFC 6376 (through the signer).
"""

from __future__ import annotations

import html
import re
import secrets
import unicodedata
from collections.abc import Callable
from email import charset as _charset
from email.errors import HeaderParseError
from email.header import Header, decode_header, make_header
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import formataddr, formatdate
from typing import Final

from kithmail.db import InvalidError, fold_address
from kithmail.sav.tokens import reply_address

__all__ = ["MAX_NAME", "MAX_SUBJECT", "clean_text", "compose", "msg_id"]

MAX_SUBJECT: Final = 120  # characters of the held subject shown
MAX_NAME: Final = 64  # characters of a display name
_POLICY: Final = compat32.clone(linesep="\r\n", max_line_length=78)
_MSG_ID = re.compile(r"<[!-;=?-~]{1,200}@[!-;=?-~]{1,200}>")

_UTF8_QP = _charset.Charset("utf-8")
_UTF8_QP.body_encoding = _charset.QP


def clean_text(raw: str, limit: int) -> str:
    """A held message's field as one safe line of at most ``limit`` characters.

    Encoded words are decoded (a broken one is kept as written); control
    characters, format characters (bidi overrides, zero-width) and line or
    paragraph separators become spaces; runs of white space become one.
    """
    try:
        text = str(make_header(decode_header(raw)))
    except (HeaderParseError, LookupError, UnicodeError, ValueError):
        text = raw
    text = "".join(
        " " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs") else c for c in text
    )
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "\u2026"
    return text


def _plain(text: str) -> bool:
    """Text that can stand in a header as it is: printable ASCII, no encoded-word opener."""
    return text.isascii() and text.isprintable() and "=?" not in text


def _unstructured(name: str, text: str) -> str | Header:
    """A value for an unstructured field: as is when plain, else encoded words only."""
    if _plain(text):
        return text
    return Header(text, "utf-8", header_name=name)


def _mailbox(name: str, address: str) -> str:
    """``"Name" <address>`` (or the address alone), the name quoted or encoded."""
    if not name:
        return f"<{address}>"
    if _plain(name):
        return formataddr((name, address))  # quotes it, escaping '"' and '\\'
    encoded = Header(name, "utf-8").encode(linesep="\r\n")
    return f"{encoded} <{address}>"


def msg_id(value: str) -> str:
    """The Message-ID of the held message when it is one well-formed msg-id, else ""."""
    v = value.strip()
    return v if _MSG_ID.fullmatch(v) else ""


def _ascii_address(address: str, what: str) -> str:
    try:
        folded = fold_address(address)
    except InvalidError as e:
        raise ValueError(f"{what}: {e}") from None
    if not folded.isascii():
        raise ValueError(f"{what} {address!r}: a challenge goes to ASCII addresses only")
    return folded


def compose(
    *,
    recipient: str,
    sender: str,
    subject: str,
    token: str,
    public_url: str,
    now: float,
    sender_name: str = "",
    held_message_id: str = "",
    from_local: str = "postmaster",
    signer: Callable[[bytes], bytes] | None = None,
) -> bytes:
    """The challenge for ``sender`` about a message held for ``recipient``.

    ``subject`` and ``sender_name`` are the held message's Subject and the
    display name of its From, as received (encoded words and all);
    ``held_message_id`` its Message-ID. The From and reply addresses are at
    the recipient's domain. ValueError when an address is not a plain one.
    """
    rcpt = _ascii_address(recipient, "recipient")
    to = _ascii_address(sender, "sender")
    domain = rcpt.rpartition("@")[2]
    shown_subject = clean_text(subject, MAX_SUBJECT) or "(no subject)"
    name = clean_text(sender_name, MAX_NAME)
    link = f"{public_url.rstrip('/')}/sav/{token}"
    reply_to = reply_address(token, domain)

    text = (
        "Hello,\n"
        "\n"
        f"You sent a message to {rcpt} with the subject\n"
        f"    {shown_subject}\n"
        "\n"
        "It is being held until you confirm that it came from you: this is\n"
        "your first message to them, and their mail system delivers mail from\n"
        "new senders once they have confirmed, once.\n"
        "\n"
        "To confirm, reply to this message (what you write does not matter),\n"
        "or open this page and press the button:\n"
        "\n"
        f"    {link}\n"
        "\n"
        "Your message and later ones to them will then be delivered at once.\n"
        "If you did not send that message, please ignore this one: nothing\n"
        "more will be sent.\n"
        "\n"
        "Thank you,\n"
        f"the mail system of {domain}\n"
    )
    e = html.escape
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        "<title>Please confirm your message</title></head>\n"
        '<body style="font-family: sans-serif; line-height: 1.5; color: #222;">\n'
        "<p>Hello,</p>\n"
        f"<p>You sent a message to <strong>{e(rcpt)}</strong> with the subject "
        f"<strong>{e(shown_subject)}</strong>.</p>\n"
        "<p>It is being held until you confirm that it came from you: this is your "
        "first message to them, and their mail system delivers mail from new senders "
        "once they have confirmed, once.</p>\n"
        "<p>To confirm, reply to this message (what you write does not matter), or "
        "open this page and press the button:</p>\n"
        f'<p><a href="{e(link)}" style="display: inline-block; padding: 0.5em 1em; '
        'background: #2a5db0; color: #fff; text-decoration: none; border-radius: 4px;">'
        "Confirm my message</a></p>\n"
        f"<p>or copy this address into your browser: {e(link)}</p>\n"
        "<p>Your message and later ones to them will then be delivered at once. If you "
        "did not send that message, please ignore this one: nothing more will be sent.</p>\n"
        f"<p>Thank you,<br>the mail system of {e(domain)}</p>\n"
        "</body></html>\n"
    )

    msg = MIMEMultipart("alternative", policy=_POLICY)
    msg["From"] = formataddr((f"Mail system of {domain}", f"{from_local}@{domain}"))
    msg["To"] = _mailbox(name, to)
    msg["Reply-To"] = f"<{reply_to}>"
    # typeshed types a field's value as str; compat32 takes a Header too (and encodes it).
    msg["Subject"] = _unstructured("Subject", f"Please confirm your message: {shown_subject}")  # type: ignore[assignment]
    msg["Date"] = formatdate(now, usegmt=True)
    msg["Message-ID"] = f"<{secrets.token_hex(16)}.sav@{domain}>"
    if ref := msg_id(held_message_id):
        msg["In-Reply-To"] = ref
        msg["References"] = ref
    msg["Auto-Submitted"] = "auto-replied"  # RFC 3834 §5.1
    # typeshed says str; MIMEText takes a Charset too, here to choose QP over base64.
    msg.attach(MIMEText(text, "plain", _UTF8_QP))  # type: ignore[arg-type]
    msg.attach(MIMEText(page, "html", _UTF8_QP))  # type: ignore[arg-type]
    # The boundary is random (the email package's), and no part holds text
    # of the held message raw: QP cannot produce a "--boundary" line.
    data = msg.as_bytes(policy=_POLICY)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return signer(data) if signer is not None else data
