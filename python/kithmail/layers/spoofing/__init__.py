"""Layer 3, anti-spoofing: SPF at RCPT; DKIM, DMARC and ARC at the end of DATA.

SPF (`spf.py`) runs at the first RCPT that Recon and Reputation let
through — never before them, so a source Recon defers costs no DNS query —
for the MAIL FROM identity (the HELO identity for the null sender), and
acts as `[spf]` says for its result. At the end of DATA, DKIM (`dkim.py`)
verifies every signature (at most `[dkim] max_signatures`), DMARC
(`dmarc.py`) evaluates the header From's policy with relaxed or strict
alignment, ARC (`arc.py`) validates a forwarded message's chain, and mail
from outside that claims one of our own domains without authenticating is
spoofing (`[spoofing] own_domains`). The results go into the transaction's
`AuthResults`, from which the listener writes one Authentication-Results
header; the layer returns one `Verdict` for the transaction.

Every action reads its policy from the `TenantPolicy` of the recipients'
domain. Each sub-check honours its section's `mode = "shadow"`.
"""

from __future__ import annotations

from kithmail.layers.spoofing.results import (
    ArcResult,
    AuthResults,
    DkimResult,
    DmarcResult,
    SpfResult,
)

__all__ = ["ArcResult", "AuthResults", "DkimResult", "DmarcResult", "SpfResult"]
