"""SMTP paths, parsed strictly: what MAIL FROM and RCPT TO may carry.

Trusts nothing: every byte of a path comes from the client. A path is parsed
by RFC 5321 §4.1.2 (Reverse-path, Forward-path, Mailbox, Local-part,
Domain, address-literal) with RFC 6531's UTF-8 extension when the
transaction declared SMTPUTF8. What the classic relay tricks need is refused
here, before any table sees the address:

- source routes (`<@a,@b:user@c>`): refused (RFC 5321 §4.1.1.3 lets a
  server ignore them; refusing is simpler to reason about and no sender
  needs them since 1989);
- a recipient's local part holding `%`, `!` or `@` (the `%` hack, UUCP bang
  paths, a quoted `"a@b"`): refused for recipients, since a downstream
  server might still route on them;
- address literals (`user@[192.0.2.1]`) and trailing dots (`example.test.`)
  are never a local domain, so they can only be relaying (refused by the
  caller for untrusted clients).

The one path without a domain, the recipient `<Postmaster>` (RFC 5321
§4.1.1.3, any case), is accepted with `domain == ""`; the caller decides
whose postmaster it is.

Standards: RFC 5321 §4.1.2 and §4.5.3.1 (lengths), RFC 6531 (SMTPUTF8),
RFC 5890 (IDNA: domains compared in their A-label form).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kithmail import InvalidInputError
from kithmail._core import normalize_address

__all__ = ["Path", "PathError", "parse_path", "split_params"]

# RFC 5321 §4.1.2, with RFC 6531 allowing UTF-8 (non-ASCII) in atext and
# in qtext; the non-ASCII ranges are admitted only under SMTPUTF8.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_STRING = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(\.[{_ATEXT}\u0080-\U0010ffff]+)*")
_QUOTED = re.compile(r'"([\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_LABEL = re.compile(
    r"[A-Za-z0-9\u0080-\U0010ffff]([A-Za-z0-9\-\u0080-\U0010ffff]*[A-Za-z0-9\u0080-\U0010ffff])?"
)
_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]")
_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*(=[\x21-\x3c\x3e-\x7e]+)?")

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class PathError(ValueError):
    """A path the server refuses; `reply` is the whole SMTP reply line."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.status = status
        self.text = text

    @property
    def reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"


@dataclass(frozen=True, slots=True)
class Path:
    """A parsed mailbox. `address` is as given (for the envelope and headers);
    `folded` is the form tables compare (case, IDN A-labels); `domain` the
    folded domain, or "" for the null path. `literal` marks `[…]` domains."""

    address: str
    folded: str
    local: str
    domain: str
    quoted: bool = False
    literal: bool = False

    @property
    def null(self) -> bool:
        return not self.address

    @property
    def postmaster(self) -> bool:
        """`postmaster@…` or the bare `<Postmaster>`, in any case (RFC 5321 §4.5.1)."""
        return not self.quoted and self.local.lower() == "postmaster"


def _syntax(what: str) -> PathError:
    return PathError(501, "5.1.3", f"Bad {what} address syntax")


def split_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters (`KEY=VALUE KEY`), keys upper-cased; 555 on anything odd."""
    params: dict[str, str | None] = {}
    for word in text.split():
        if not _PARAM.fullmatch(word):
            raise PathError(555, "5.5.4", "Malformed ESMTP parameter")
        key, eq, value = word.partition("=")
        key = key.upper()
        if key in params:
            raise PathError(555, "5.5.4", f"{key} given twice")
        params[key] = value if eq else None
    return params


def parse_path(arg: str, *, keyword: str, utf8: bool, recipient: bool) -> tuple[Path, str]:
    """`FROM:<path> params` or `TO:<path> params` → (Path, parameter text).

    `keyword` is "FROM:" or "TO:". Raises PathError with the reply to send.
    """
    what = "recipient" if recipient else "sender"
    if arg[: len(keyword)].upper() != keyword:
        raise PathError(
            501, "5.5.4", f"Syntax: {'RCPT TO' if recipient else 'MAIL FROM'}:<address>"
        )
    rest = arg[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        raise PathError(501, "5.5.4", "Addresses go in angle brackets: <user@domain>")
    end = _closing_bracket(rest)
    if end < 0:
        raise _syntax(what)
    inner, params = rest[1:end], rest[end + 1 :]
    if params and not params.startswith(" "):
        raise _syntax(what)
    if len(inner) > MAX_PATH:
        raise PathError(501, "5.1.3", f"The {what} address is too long")
    if not utf8 and any(ord(c) > 127 for c in inner):
        raise PathError(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
    if inner.startswith("@"):
        raise PathError(553, "5.7.1", "Source routes are not accepted")
    if not inner:
        if recipient:
            raise _syntax(what)
        return Path("", "", "", ""), params.strip()
    if recipient and inner.lower() == "postmaster":
        # RFC 5321 §4.1.1.3: the one mailbox without a domain, the server's
        # own postmaster; the caller names the domain (Path.domain is "").
        return Path(inner, "postmaster", inner, ""), params.strip()
    return _mailbox(inner, what, recipient), params.strip()


def _closing_bracket(s: str) -> int:
    """Index of the `>` that closes s[0] == '<', skipping quoted strings."""
    quoted = escaped = False
    for i, c in enumerate(s[1:], 1):
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
        elif c == "<" and not quoted:
            return -1
    return -1


def _mailbox(inner: str, what: str, recipient: bool) -> Path:
    at = inner.rfind("@")
    if at <= 0:
        raise _syntax(what)
    local, domain = inner[:at], inner[at + 1 :]
    quoted = local.startswith('"')
    if quoted:
        if not _QUOTED.fullmatch(local):
            raise _syntax(what)
    elif not _DOT_STRING.fullmatch(local):
        raise _syntax(what)
    if len(local.encode()) > MAX_LOCAL:
        raise PathError(553, "5.1.3", f"The {what} local part is too long")
    literal = domain.startswith("[")
    if literal:
        if not _LITERAL.fullmatch(domain):
            raise _syntax(what)
    else:
        if domain.endswith(".") or not domain or len(domain.encode()) > MAX_DOMAIN:
            raise _syntax(what)
        if not all(_LABEL.fullmatch(label) and len(label) <= 63 for label in domain.split(".")):
            raise _syntax(what)
    if recipient and (quoted or any(c in local for c in "%!@")):
        raise PathError(553, "5.7.1", "Routing in the local part (%, !, quoted @) is not accepted")
    if literal:
        return Path(inner, inner.lower(), local, domain.lower(), quoted, True)
    try:
        folded = normalize_address(f"{local}@{domain}") if not quoted else ""
    except InvalidInputError:
        folded = ""
    if not folded:
        # Quoted local parts and what the core cannot fold are compared as
        # given, lower-cased; they can match no local user anyway.
        folded = f"{local.lower()}@{domain.lower()}"
    return Path(inner, folded, local, folded.rpartition("@")[2], quoted, False)
