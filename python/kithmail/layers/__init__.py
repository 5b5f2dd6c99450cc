"""The five layers' common vocabulary: a decision and its reason are one object.

Each layer module (`recon`, `reputation`, `spoofing`, `antivirus`,
`community`) returns a `Verdict` and never writes to a socket, so the same
layers serve the SMTP listener and the Postfix policy service. An exception
from a layer means "could not decide"; the caller turns it into a 4xx.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class Layer(enum.StrEnum):
    RECON = "recon"
    REPUTATION = "reputation"
    SPOOFING = "spoofing"
    ANTIVIRUS = "antivirus"
    COMMUNITY = "community"


class Action(enum.StrEnum):
    ACCEPT = "accept"
    TAG = "tag"
    QUARANTINE = "quarantine"
    DEFER = "defer"
    REJECT = "reject"
    DISCARD = "discard"


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """An SMTP reply: code, enhanced status (RFC 3463) and one line of text."""

    code: int
    status: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"not an SMTP reply code: {self.code}")
        if any(c in self.text for c in "\r\n"):
            raise ValueError("an SMTP reply text is one line")

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one layer decided, and why, in a form every consumer can use.

    `reason` is a stable code ("recon.new_source", "spf.softfail") that
    travels with the message into logs, metrics, the quarantine and headers;
    `detail` is for people. `shadow` marks a decision taken in shadow mode:
    recorded, not acted on.
    """

    layer: Layer
    action: Action
    reason: str
    detail: str = ""
    reply: SmtpReply | None = None
    shadow: bool = False

    @property
    def acts(self) -> bool:
        """True when this verdict changes what happens to the mail."""
        return not self.shadow and self.action is not Action.ACCEPT

    def in_shadow(self) -> Verdict:
        """The same decision, recorded but not enforced."""
        return replace(self, shadow=True)
