"""ARC (RFC 8617): validate a forwarded message's chain and name its last sealer.

dkimpy validates the chain; as for DKIM (`dkim.py`), the keys of every
ARC-Seal and ARC-Message-Signature are prefetched through kithmail's
resolver and dkimpy is given a `dnsfunc` answering from them, in a thread.
A chain of more than `max_sets` sets is `fail` without any lookup (RFC
8617 §5.1.1 allows at most 50; the operator chooses fewer), and so is a
chain whose key lookups time out: ARC has no temporary result (RFC 8617
§4.4), and a chain we could not check vouches for nothing.

The result is only a record: DMARC (`__init__.py`) may let a trusted
sealer's `pass` override its `fail`, and only for sealers listed in
`[arc] trusted_sealers`.

Trusts nothing in the message: the sealer named is the `d=` of the newest
ARC-Seal as written, which means something only when the chain passes.
Standards: RFC 8617 (ARC), RFC 6376 (the signatures it reuses).
"""

from __future__ import annotations

import asyncio
import re

import dkim as dkimpy

from kithmail.dns import Resolver
from kithmail.layers.spoofing.dkim import (
    DKIMPY_LOG,
    MIN_KEY_BITS,
    KeyCache,
    dnsfunc,
    fetch_keys,
    signatures,
)
from kithmail.layers.spoofing.results import ArcResult

__all__ = ["verify"]

_INSTANCE = re.compile(rb"(?:^|[\s;])i\s*=\s*(\d+)", re.IGNORECASE)


def _verify_sync(message: bytes, keys: KeyCache) -> tuple[bytes | None, str]:
    a = dkimpy.ARC(message, logger=DKIMPY_LOG, minkey=MIN_KEY_BITS)
    try:
        cv, _results, reason = a.verify(dnsfunc=dnsfunc(keys))
    except (dkimpy.DKIMException, ValueError, TypeError, IndexError, KeyError) as e:
        return dkimpy.CV_Fail, f"{type(e).__name__}: {e}"
    return cv, str(reason)


async def verify(message: bytes, resolver: Resolver, *, max_sets: int) -> ArcResult:
    """The chain's result, the sealer of its newest set and how many sets it has."""
    try:
        headers, _ = dkimpy.rfc822_parse(message)
    except dkimpy.DKIMException:
        return ArcResult("fail", reason="the header does not parse")
    seals = [v for n, v in headers if n.lower() == b"arc-seal"]
    if not seals:
        return ArcResult("none")
    instances: list[int] = []
    for v in seals:
        m = _INSTANCE.search(v)
        instances.append(int(m.group(1)) if m and len(m.group(1)) < 4 else 0)
    sets = max(instances)
    newest = seals[instances.index(sets)]
    sealer = next((s.domain for s in signatures([(b"arc-seal", newest)], b"arc-seal")), "")
    if len(seals) > max_sets or sets > max_sets:
        return ArcResult("fail", sealer, len(seals), f"more than max_sets={max_sets} ARC sets")

    sigs = signatures(headers, b"arc-seal") + signatures(headers, b"arc-message-signature")
    if any(s.problem for s in sigs):
        return ArcResult("fail", sealer, sets, "an ARC signature does not parse")
    keys = await fetch_keys(resolver, [s.key_name for s in sigs])
    if any(r.temporary for r in keys.values()):
        return ArcResult("fail", sealer, sets, "an ARC key lookup timed out or failed")
    cv, reason = await asyncio.to_thread(_verify_sync, message, keys)
    if cv == dkimpy.CV_Pass:
        return ArcResult("pass", sealer, sets)
    if cv == dkimpy.CV_None:
        return ArcResult("none", sealer, sets, reason[:200])
    return ArcResult("fail", sealer, sets, reason[:200])
