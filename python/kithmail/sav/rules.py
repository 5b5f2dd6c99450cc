"""The no-backscatter tests of SAV, as pure functions of a message's headers and auth results.

`automatic` tells list, bulk and machine-sent mail (which earns no
challenge, and whose "reply" to a challenge is no confirmation);
`authenticated` tells whether the envelope sender is proven by SPF or an
aligned DKIM signature (a challenge to an unproven sender could land on a
forged, innocent address: backscatter). `header_fields` reads a header
block as both take it.

Trusts nothing in the headers: names are compared case-insensitively,
values are parsed leniently, and whatever cannot be parsed counts as
automatic, never as personal. Standards: RFC 3834 (Auto-Submitted, and
what an automatic responder must not answer), RFC 2369 and 2919
(List-* and List-Id), RFC 6522 (multipart/report), RFC 7208 (SPF),
RFC 6376 and RFC 7489 §3.1 (DKIM and relaxed alignment).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kithmail.layers.spoofing.dmarc import aligned, default_psl
from kithmail.layers.spoofing.dmarc import header_fields as _header_fields
from kithmail.layers.spoofing.results import AuthResults

__all__ = ["Headers", "authenticated", "automatic", "field", "header_fields"]

# (name, value) pairs of a header block, in order; names in any case.
Headers = Sequence[tuple[str, str]]

_LIST_FIELDS = frozenset(
    {"list-id", "list-unsubscribe", "list-post", "list-help", "list-subscribe", "list-owner"}
)
_BULK_PRECEDENCE = frozenset({"bulk", "list", "junk", "auto_reply"})
# Vacation and auto-responders that predate RFC 3834 say so in their own ways.
_AUTOREPLY_FIELDS = frozenset({"x-autoreply", "x-autorespond"})


def header_fields(block: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each field of a message's header block."""
    head, _, _ = block.partition(b"\r\n\r\n")
    return _header_fields(head.split(b"\r\n"))


def _first_word(value: str) -> str:
    """The first token of a structured value, comments and parameters left out."""
    v = value
    # RFC 5322 comments, as Auto-Submitted allows ("auto-replied (vacation)").
    while "(" in v:
        start = v.index("(")
        end = v.find(")", start)
        v = v[:start] + " " + (v[end + 1 :] if end >= 0 else "")
    return v.split(";", 1)[0].strip().lower()


def automatic(headers: Headers) -> str | None:
    """Why the message is list, bulk or automatic mail (a short phrase); None when personal."""
    for name, value in headers:
        n = name.strip().lower()
        if n in _LIST_FIELDS:
            return f"it has {n.title()}"
        if n == "precedence" and _first_word(value) in _BULK_PRECEDENCE:
            return f"Precedence: {_first_word(value)}"
        if n == "auto-submitted" and _first_word(value) != "no":
            # Anything but "no", including garbage, is automatic (RFC 3834 §5).
            return "Auto-Submitted: " + (_first_word(value)[:40] or "(empty)")
        if n in _AUTOREPLY_FIELDS:
            return f"it has {n.title()}"
        if n == "content-type" and _first_word(value) == "multipart/report":
            return "it is a report (a bounce or a DSN)"
    return None


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


def authenticated(sender: str, auth: AuthResults) -> str | None:
    """How the envelope sender is proven ("spf" or "dkim:<d>"); None when it is not.

    SPF must have passed for the sender's own domain (the MAIL FROM check,
    not HELO); a DKIM signature must verify and its d= be aligned (relaxed,
    same organisational domain) with the sender's domain.
    """
    domain = _domain_of(sender)
    if not domain:
        return None
    spf = auth.spf_mailfrom
    if spf is not None and spf.result == "pass" and spf.domain.lower().rstrip(".") == domain:
        return "spf"
    psl = default_psl()
    for d in auth.dkim:
        if d.result == "pass" and aligned(d.domain, domain, "r", psl):
            return f"dkim:{d.domain.lower()}"
    return None


def field(headers: Iterable[tuple[str, str]], name: str) -> str:
    """The first field ``name`` (any case), or ""."""
    want = name.lower()
    for n, v in headers:
        if n.strip().lower() == want:
            return v
    return ""
