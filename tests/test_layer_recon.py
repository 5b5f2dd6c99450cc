"""Layer 1 at RCPT: the Recon verdict over the real core table.

SPF itself is the anti-spoofing layer's (not built yet); here it is a
scripted answer so each narrow path can be driven, and every test checks
when SPF is asked at all: never for a stranger.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import kithmail
from kithmail.config import Recon as ReconPolicy
from kithmail.layers import Verdict, recon
from kithmail.layers.recon import SpfAnswer

TRUSTED = ["127.0.0.1/32", "::1/128"]
ANN = "ann@example.test"


class ScriptedSpf:
    """Answers every SPF question the same way and remembers who asked."""

    def __init__(self, answer: SpfAnswer | None = None) -> None:
        self.answer = answer or SpfAnswer("none")
        self.asked: list[tuple[str, str]] = []

    async def __call__(self, ip: str, sender: str) -> SpfAnswer:
        self.asked.append((ip, sender))
        return self.answer


@pytest.fixture
def core(tmp_path: Path) -> kithmail.Core:
    c = kithmail.Core(str(tmp_path / "core"), min_delay=60, retry_window=3600)
    return c


def run(
    core: kithmail.Core,
    ip: str,
    now: int,
    *,
    sender: str = "bob@example.org",
    rcpt: str = ANN,
    spf: ScriptedSpf | None = None,
    **policy: object,
) -> Verdict:
    p = ReconPolicy.model_validate({"min_delay": "60s", "retry_window": "1h", **policy})
    return asyncio.run(
        recon.check(
            core,
            p,
            TRUSTED,
            client_ip=ip,
            mail_from=sender,
            recipient=rcpt,
            now=now,
            spf=spf or ScriptedSpf(),
        )
    )


def test_new_source_is_deferred_then_its_retry_passes(core: kithmail.Core) -> None:
    spf = ScriptedSpf(SpfAnswer("pass", 24))
    v = run(core, "198.51.100.7", 1000, spf=spf)
    assert (v.action, v.reason, v.reply.code, v.reply.status) == (  # type: ignore[union-attr]
        "defer",
        "recon.new_source",
        451,
        "4.7.1",
    )
    assert "retry in 60 s" in str(v.reply)
    v = run(core, "198.51.100.7", 1030, spf=spf)
    assert (v.action, v.reason) == ("defer", "recon.too_early")
    assert "retry in 30 s" in str(v.reply)
    v = run(core, "198.51.100.7", 1061, spf=spf)
    assert (v.action, v.reason, v.detail) == ("accept", "recon.passed", "delayed 61 s")
    assert run(core, "198.51.100.7", 5000, spf=spf).reason == "recon.known"
    assert spf.asked == [], "a stranger's source costs no DNS query"


def test_trusted_and_exempt_sources_are_never_deferred_nor_recorded(core: kithmail.Core) -> None:
    assert run(core, "127.0.0.1", 0).reason == "recon.trusted_network"
    assert run(core, "::ffff:127.0.0.1", 0).reason == "recon.trusted_network"
    assert run(core, "192.0.2.9", 0, exempt_networks=["192.0.2.0/24"]).reason == (
        "recon.exempt_network"
    )
    core.recon.exempt_add("203.0.113.0/24")  # from kith recon exempt
    assert run(core, "203.0.113.5", 0).reason == "recon.exempt"
    assert run(core, "198.51.100.1", 0, exempt_recipients=["@example.test"]).reason == (
        "recon.exempt_recipient"
    )
    assert len(core.recon) == 0


def test_shadow_mode_decides_but_does_not_act(core: kithmail.Core) -> None:
    v = run(core, "198.51.100.7", 0, mode="shadow")
    assert (v.action, v.reason, v.shadow, v.acts) == ("defer", "recon.new_source", True, False)
    assert run(core, "198.51.100.7", 0, enabled=False).reason == "recon.disabled"


def test_a_member_with_spf_pass_skips_recon(core: kithmail.Core) -> None:
    core.community.add(ANN, "Bob@Example.org", source="outbound")
    spf = ScriptedSpf(SpfAnswer("pass", None))
    v = run(core, "198.51.100.7", 0, spf=spf)
    assert (v.action, v.reason) == ("accept", "recon.member")
    assert spf.asked == [("198.51.100.7", "bob@example.org")]
    # A forged member address (SPF fail) is no member.
    forged = ScriptedSpf(SpfAnswer("fail"))
    v = run(core, "192.0.2.66", 0, spf=forged)
    assert (v.action, v.reason) == ("defer", "recon.new_source")
    assert len(forged.asked) == 1


def test_an_exempt_sender_counts_only_when_spf_passes(core: kithmail.Core) -> None:
    ok = run(
        core, "198.51.100.7", 0, exempt_senders=["@example.org"], spf=ScriptedSpf(SpfAnswer("pass"))
    )
    assert ok.reason == "recon.exempt_sender"
    bad = run(
        core,
        "192.0.2.7",
        0,
        exempt_senders=["@example.org"],
        spf=ScriptedSpf(SpfAnswer("softfail")),
    )
    assert bad.reason == "recon.new_source"


@pytest.mark.parametrize(
    ("ip", "answer", "passes"),
    [
        ("198.51.100.200", SpfAnswer("pass", 24), True),
        ("198.51.100.200", SpfAnswer("pass", 16), False),  # /16 is not narrower than /16
        ("198.51.100.200", SpfAnswer("pass", None, all=True), False),  # +all never counts
        ("198.51.100.200", SpfAnswer("neutral", 24), False),
        ("2001:db8:5::25", SpfAnswer("pass", 48), True),
        ("2001:db8:5::25", SpfAnswer("pass", 32), False),
    ],
)
def test_pool_aware_retry(core: kithmail.Core, ip: str, answer: SpfAnswer, passes: bool) -> None:
    """Gmail retries from another server of its pool: that is the retry."""
    first = run(core, "198.51.100.10", 1000, sender="alerts@pool.example")
    assert first.reason == "recon.new_source"
    early = ScriptedSpf(answer)
    assert run(core, ip, 1030, sender="alerts@pool.example", spf=early).reason == "recon.new_source"
    assert early.asked == [], "before min_delay no retry is due, so no SPF query"
    spf = ScriptedSpf(answer)
    v = run(core, ip, 1061, sender="alerts@pool.example", spf=spf)
    assert v.reason == ("recon.pool_retry" if passes else "recon.too_early")
    assert len(spf.asked) == 1
    # Another recipient has no pending deferral from that domain.
    other = ScriptedSpf(answer)
    v = run(
        core, "192.0.2.50", 1061, sender="alerts@pool.example", rcpt="cy@example.test", spf=other
    )
    assert (v.reason, other.asked) == ("recon.new_source", [])


def test_the_null_sender_never_costs_a_query(core: kithmail.Core) -> None:
    spf = ScriptedSpf(SpfAnswer("pass", 24))
    assert run(core, "198.51.100.7", 0, sender="", spf=spf).reason == "recon.new_source"
    assert (
        run(core, "198.51.100.8", 0, sender="not-an-address", spf=spf).reason == "recon.new_source"
    )
    assert spf.asked == []


def test_a_deferral_never_retried_counts_against_the_source(core: kithmail.Core) -> None:
    """Self-learned reputation: each lapsed deferral is a `never_retried` event."""
    ip = "198.51.100.9"
    assert run(core, ip, 1000).reason == "recon.new_source"
    assert "never_retried" not in core.reputation.counters(ip)
    # Back after the 1 h retry window with no retry in it: new again, and lapsed.
    assert run(core, ip, 1000 + 3601).reason == "recon.new_source"
    assert run(core, ip, 1000 + 2 * 3602).reason == "recon.new_source"
    assert core.reputation.counters(ip)["never_retried"][0] == 2
    # A source that retried in time never counts.
    other = "198.51.100.10"
    run(core, other, 1000)
    assert run(core, other, 1061).reason == "recon.passed"
    # (Its /24 neighbour's two lapses show in the /24 counter, not in its own.)
    assert core.reputation.counters(other).get("never_retried", (0, 0))[0] == 0
