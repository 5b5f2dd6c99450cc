"""DKIM (RFC 6376): verify every DKIM-Signature of a message, up to a cap.

dkimpy does the cryptography; this module does the DNS and tells the
outcomes apart, which dkimpy alone does not (it logs a missing key, a
malformed key and a DNS timeout alike and returns False). The keys are
**prefetched**: each signature's `d=` and `s=` are parsed here, the key
records `<s>._domainkey.<d>` are looked up concurrently through kithmail's
one async `Resolver` (its nameservers, timeout, EDNS and answer caps, and a
status for every outcome), and each record is classified before dkimpy sees
it:

| what DNS said | result | reason |
|---|---|---|
| timeout, SERVFAIL, unreachable | temperror | "key lookup timed out" / "key lookup failed" |
| NXDOMAIN, no TXT | permerror | "no key" |
| `p=` empty | permerror | "key revoked" |
| a record dkimpy cannot parse | permerror | "malformed key: …" |

Only then is dkimpy run — in a thread, since hashing a large body is CPU
work — with a `dnsfunc` that answers from the prefetched records and never
touches the network. A signature that then does not verify is `fail`, with
"body hash did not verify" or "signature did not verify". Prefetching
rather than a blocking resolver inside dkimpy's thread keeps one resolver
and one set of DNS statuses for the whole process, and lets the lookups of
several signatures run at once instead of one after another.

At most `max_signatures` signatures are checked, the first ones in header
order; those beyond are recorded as one `policy` result ("not checked").

Trusts nothing in the message: a signature that does not parse is
`permerror` with the reason; dkimpy's exceptions are caught per signature.
Standards: RFC 6376 (DKIM), RFC 8301 (RSA key sizes, no SHA-1 reliance),
RFC 8601 §2.7.1 (result names).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dkim as dkimpy
from dkim.util import InvalidTagValueList, parse_tag_value

from kithmail.dns import Resolver, Result, Status
from kithmail.layers.spoofing.results import DkimResult

__all__ = ["KeyCache", "Signature", "fetch_keys", "key_problem", "signatures", "verify"]

# dkimpy reports through a logger; its messages carry message text, so they
# go to a logger of ours at debug level and never to the root logger.
DKIMPY_LOG = logging.getLogger("kithmail.dkim")
DKIMPY_LOG.propagate = False
DKIMPY_LOG.addHandler(logging.NullHandler())

MIN_KEY_BITS = 1024  # RFC 8301 §3.2: verifiers MUST NOT consider shorter RSA keys valid
MAX_REASON = 200


@dataclass(frozen=True, slots=True)
class Signature:
    """One DKIM-Signature (or ARC) header: where its key is, or why it has none."""

    index: int  # its position among the fields of its name, top first
    domain: str  # d=, lower-cased ("" when it does not parse)
    selector: str  # s=
    problem: str = ""  # non-empty: the signature itself is broken (permerror)

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def _ascii(tags: dict[bytes, bytes], tag: bytes) -> str:
    return tags.get(tag, b"").decode("ascii").strip()


def signatures(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[Signature]:
    """Every field called `name` (lower case) in `headers`, with its d= and s=."""
    out: list[Signature] = []
    for i, (_, value) in enumerate(h for h in headers if h[0].lower() == name):
        try:
            tags = parse_tag_value(value)
            d, s = _ascii(tags, b"d").lower(), _ascii(tags, b"s")
        except (InvalidTagValueList, UnicodeDecodeError, ValueError):
            out.append(Signature(i, "", "", "the signature does not parse"))
            continue
        if not d or not s:
            out.append(Signature(i, d, s, f"no {'d=' if not d else 's='} tag"))
            continue
        if len(s) + len(d) > 240 or any(c in d + s for c in "; \t\r\n\\\"'"):
            out.append(Signature(i, d, s, "d= or s= is not a domain name"))
            continue
        out.append(Signature(i, d, s))
    return out


KeyCache = dict[str, Result[str]]
KeyFault = Literal["temperror", "permerror"]


async def fetch_keys(resolver: Resolver, names: Sequence[str]) -> KeyCache:
    """The key records of `names`, looked up concurrently, by lower-cased name."""
    unique = list(dict.fromkeys(n.lower() for n in names))
    results = await asyncio.gather(*(resolver.txt(n) for n in unique))
    return dict(zip(unique, results, strict=True))


def _key_text(r: Result[str]) -> str:
    # RFC 6376 §3.6.2.2: with several TXT records the result is undefined;
    # take the first that looks like a key record.
    for t in r.records:
        if "p=" in t:
            return t
    return r.records[0] if r.records else ""


def key_problem(r: Result[str] | None) -> tuple[KeyFault, str] | None:
    """(result, reason) when a key record cannot serve, None when it can."""
    if r is None:
        return "permerror", "no key"
    if r.status is Status.TIMEOUT:
        return "temperror", "key lookup timed out"
    if r.status is Status.FAILURE:
        return "temperror", "key lookup failed"
    if r.status in (Status.NXDOMAIN, Status.NODATA):
        return "permerror", "no key"
    if r.status is Status.MALFORMED:
        return "permerror", "bad key query"
    text = _key_text(r)
    try:
        tags = parse_tag_value(text.encode("utf-8"))
    except (InvalidTagValueList, ValueError):
        return "permerror", "malformed key record"
    if b"p" in tags and not tags[b"p"].strip():
        return "permerror", "key revoked"  # RFC 6376 §3.6.1: an empty p= revokes
    try:
        dkimpy.evaluate_pk(b"key", text.encode("utf-8"))
    except dkimpy.NaClNotFoundError:
        return "permerror", "ed25519 keys are not supported here"
    except (dkimpy.DKIMException, ValueError, TypeError, IndexError) as e:
        return "permerror", _short(f"malformed key: {e}")
    return None


def _short(s: str) -> str:
    return s if len(s) <= MAX_REASON else s[: MAX_REASON - 3] + "..."


def dnsfunc(keys: KeyCache) -> Any:
    """A dkimpy `dnsfunc` answering only from `keys`; never the network."""

    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        n = (name.decode("ascii", "replace") if isinstance(name, bytes) else name).lower()
        r = keys.get(n.rstrip("."))
        if r is None or not r.ok:
            return None
        return _key_text(r).encode("utf-8")

    return lookup


def _verify_sync(message: bytes, checks: Sequence[Signature], keys: KeyCache) -> list[DkimResult]:
    """dkimpy on each signature whose key is good (in a worker thread)."""
    d = dkimpy.DKIM(message, logger=DKIMPY_LOG, minkey=MIN_KEY_BITS)
    lookup = dnsfunc(keys)
    out: list[DkimResult] = []
    for sig in checks:
        try:
            ok = d.verify(idx=sig.index, dnsfunc=lookup)
        except dkimpy.ValidationError as e:
            text = str(e)
            if text.startswith("body hash mismatch"):
                out.append(DkimResult("fail", sig.domain, sig.selector, "body hash did not verify"))
            else:  # a bad tag: i= outside d=, t= in the future, x= expired, ...
                out.append(DkimResult("permerror", sig.domain, sig.selector, _short(text)))
            continue
        except dkimpy.KeyFormatError as e:  # e.g. a key shorter than MIN_KEY_BITS
            out.append(DkimResult("permerror", sig.domain, sig.selector, _short(str(e))))
            continue
        except (dkimpy.DKIMException, ValueError, TypeError, IndexError, KeyError) as e:
            reason = _short(f"{type(e).__name__}: {e}")
            out.append(DkimResult("permerror", sig.domain, sig.selector, reason))
            continue
        if ok:
            out.append(DkimResult("pass", sig.domain, sig.selector))
        else:
            out.append(DkimResult("fail", sig.domain, sig.selector, "signature did not verify"))
    return out


async def verify(message: bytes, resolver: Resolver, *, max_signatures: int) -> list[DkimResult]:
    """One result per DKIM-Signature of `message`, in header order (empty: none).

    `message` is the whole message as received, CRLF line ends.
    """
    try:
        headers, _ = dkimpy.rfc822_parse(message)
    except dkimpy.DKIMException:
        headers = None
    if headers is None:
        # Only a header block dkimpy cannot split reaches here; the listener
        # refuses most of them. No signature can be checked on it.
        if b"dkim-signature:" in message.split(b"\r\n\r\n", 1)[0].lower():
            return [DkimResult("permerror", "", "", "the header does not parse")]
        return []
    sigs = signatures(headers, b"dkim-signature")
    if not sigs:
        return []
    checked, extra = sigs[:max_signatures], sigs[max_signatures:]
    keys = await fetch_keys(resolver, [s.key_name for s in checked if not s.problem])

    results: dict[int, DkimResult] = {}
    to_verify: list[Signature] = []
    for s in checked:
        if s.problem:
            results[s.index] = DkimResult("permerror", s.domain, s.selector, s.problem)
            continue
        bad = key_problem(keys.get(s.key_name.lower()))
        if bad is not None:
            results[s.index] = DkimResult(bad[0], s.domain, s.selector, bad[1])
        else:
            to_verify.append(s)
    if to_verify:
        verified = await asyncio.to_thread(_verify_sync, message, to_verify, keys)
        for s, r in zip(to_verify, verified, strict=True):
            results[s.index] = r
    out = [results[s.index] for s in checked]
    if extra:
        # One entry for all of them: a flood of signatures must not become a
        # flood of Authentication-Results lines.
        why = f"{len(extra)} more signature(s) not checked (max_signatures={max_signatures})"
        out.append(DkimResult("policy", "", "", why))
    return out
