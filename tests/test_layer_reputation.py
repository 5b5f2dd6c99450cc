"""Layer 2 (kithmail.layers.reputation) with a real core, a real dnsmasq
serving DNSBL zones, and a silent socket for a DNSBL that never answers.

Every DNS query dnsmasq receives is in its log, and every datagram the
silent socket receives is counted: that is how the tests prove that no
query is made when a local list decided.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from dns_server import Dnsmasq, SilentServer, StartDnsmasq

import kithmail
from kithmail import config
from kithmail.dns import Resolver
from kithmail.layers import Action, Layer, Verdict
from kithmail.layers.reputation import Reputation, dnsbl_name

ZEN = "zen.example.test"
BL = "bl.example.test"
LISTED = "192.0.2.7"
LISTED6 = "2001:db8::7"
CLEAN = "198.51.100.1"
REFUSED_BY_LIST = "192.0.2.99"


@pytest.fixture
def dnsbl(dnsmasq: StartDnsmasq) -> Dnsmasq:
    """zen lists 192.0.2.7 and 2001:db8::7, and answers 127.255.255.254 for
    192.0.2.99 (Spamhaus: "query via a public resolver, refused"); bl lists
    nobody. Names outside these zones are REFUSED."""
    return dnsmasq(
        zones=[ZEN, BL],
        a=[
            (dnsbl_name(LISTED, ZEN), "127.0.0.2"),
            (dnsbl_name(LISTED6, ZEN), "127.0.0.4"),
            (dnsbl_name(REFUSED_BY_LIST, ZEN), "127.255.255.254"),
        ],
    )


def layer(core: kithmail.Core, nameserver: str, **reputation: Any) -> Reputation:
    s = config.from_mapping(
        {"dns": {"nameservers": [nameserver], "timeout": 0.3}, "reputation": reputation}
    )
    return Reputation.from_settings(core, s, Resolver.from_settings(s.dns))


def check(rep: Reputation, ip: str) -> Verdict:
    async def main() -> Verdict:
        return await rep.check(ip)

    return asyncio.run(main())


def asked(server: Dnsmasq) -> list[str]:
    """Names asked of the server, after its readiness probe."""
    return [name for _, name, _ in server.queries()[1:]]


def test_dnsbl_names_follow_rfc_5782() -> None:
    assert dnsbl_name("192.0.2.99", "bl.test") == "99.2.0.192.bl.test"
    assert dnsbl_name("::ffff:192.0.2.99", "bl.test") == "99.2.0.192.bl.test"
    assert dnsbl_name("2001:db8:1:2:3:4:567:89ab", "bl.test") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.test"
    )


def test_a_listed_address_is_rejected_naming_the_zone(core: kithmail.Core, dnsbl: Dnsmasq) -> None:
    v = check(layer(core, dnsbl.address, dnsbl=[BL, ZEN]), LISTED)
    assert (v.layer, v.action, v.reason) == (Layer.REPUTATION, Action.REJECT, "reputation.dnsbl")
    assert str(v.reply) == (
        "554 5.7.1 Service unavailable; client host [192.0.2.7] blocked using zen.example.test"
    )
    assert v.detail == "192.0.2.7 listed by zen.example.test (127.0.0.2)"
    assert v.acts
    # Both zones were asked, once each.
    assert sorted(asked(dnsbl)) == sorted([dnsbl_name(LISTED, BL), dnsbl_name(LISTED, ZEN)])


def test_an_unlisted_address_is_accepted(core: kithmail.Core, dnsbl: Dnsmasq) -> None:
    v = check(layer(core, dnsbl.address, dnsbl=[BL, ZEN]), CLEAN)
    assert (v.action, v.reason, v.reply, v.acts) == (
        Action.ACCEPT,
        "reputation.clean",
        None,
        False,
    )
    assert len(asked(dnsbl)) == 2


def test_an_ipv6_listing_is_found_by_its_nibbles(core: kithmail.Core, dnsbl: Dnsmasq) -> None:
    v = check(layer(core, dnsbl.address, dnsbl=[ZEN], on_listed="defer"), LISTED6)
    assert (v.action, v.reason) == (Action.DEFER, "reputation.dnsbl")
    assert str(v.reply) == (
        "451 4.7.1 Service unavailable; client host [2001:db8::7] blocked using "
        "zen.example.test; try again later"
    )
    assert "127.0.0.4" in v.detail
    assert asked(dnsbl) == [dnsbl_name(LISTED6, ZEN)]


def test_an_ipv4_mapped_client_is_its_ipv4_address(core: kithmail.Core, dnsbl: Dnsmasq) -> None:
    v = check(layer(core, dnsbl.address, dnsbl=[ZEN]), "::ffff:192.0.2.7")
    assert (v.reason, v.detail) == (
        "reputation.dnsbl",
        "192.0.2.7 listed by zen.example.test (127.0.0.2)",
    )
    assert asked(dnsbl) == [dnsbl_name(LISTED, ZEN)]


def test_on_listed_quarantine_accepts_the_rcpt(core: kithmail.Core, dnsbl: Dnsmasq) -> None:
    v = check(layer(core, dnsbl.address, dnsbl=[ZEN], on_listed="quarantine"), LISTED)
    assert (v.action, v.reason, v.reply) == (Action.QUARANTINE, "reputation.dnsbl", None)


def test_a_refused_code_is_not_a_listing_but_an_error(
    core: kithmail.Core, dnsbl: Dnsmasq, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="kithmail.reputation"):
        v = check(layer(core, dnsbl.address, dnsbl=[ZEN]), REFUSED_BY_LIST)
    assert (v.action, v.reason, v.reply) == (Action.ACCEPT, "reputation.dnsbl_error", None)
    assert "zen.example.test" in v.detail and "127.255.255.254" in v.detail
    assert any("127.255.255.254" in r.getMessage() for r in caplog.records)


def test_a_dnsbl_that_never_answers_does_not_block_mail(
    core: kithmail.Core, silent: SilentServer
) -> None:
    v = check(layer(core, silent.address, dnsbl=[ZEN]), LISTED)
    assert (v.action, v.reason, v.reply) == (Action.ACCEPT, "reputation.dnsbl_error", None)
    assert "zen.example.test: timeout" in v.detail
    assert silent.received() >= 1


def test_a_listing_stands_when_another_zone_fails(core: kithmail.Core, dnsbl: Dnsmasq) -> None:
    # dnsmasq refuses names outside its zones: that zone "fails".
    v = check(layer(core, dnsbl.address, dnsbl=["broken.example.test", ZEN]), LISTED)
    assert (v.action, v.reason) == (Action.REJECT, "reputation.dnsbl")
    assert "not answered: broken.example.test: failure" in v.detail


def test_the_allow_list_beats_a_dnsbl_listing_without_a_query(
    core: kithmail.Core, dnsbl: Dnsmasq
) -> None:
    core.reputation.load("partners", "allow", ["192.0.2.0/28"], action="accept")
    rep = layer(core, dnsbl.address, dnsbl=[ZEN])
    v = check(rep, LISTED)
    assert (v.action, v.reason, v.reply) == (Action.ACCEPT, "reputation.allowlisted", None)
    assert v.detail == "192.0.2.7 is on allow list partners (192.0.2.0/28)"
    assert rep.allowlisted(LISTED) == v
    assert rep.skips_recon(LISTED)
    assert asked(dnsbl) == []
    # The same server is asked for an address outside the allow list.
    assert check(rep, "192.0.2.100").reason == "reputation.clean"
    assert asked(dnsbl) == [dnsbl_name("192.0.2.100", ZEN)]
    assert rep.allowlisted("192.0.2.100") is None
    assert not rep.skips_recon("192.0.2.100")


def test_a_local_block_list_takes_its_action_without_a_query(
    core: kithmail.Core, silent: SilentServer
) -> None:
    core.reputation.load("abusers", "block", ["203.0.113.0/24"], action="reject")
    core.reputation.load("suspects", "block", ["203.0.113.128/25"], action="defer")
    rep = layer(core, silent.address, dnsbl=[ZEN])
    v = check(rep, "203.0.113.200")  # longest prefix: the /25
    assert (v.action, v.reason) == (Action.DEFER, "reputation.local_list")
    assert v.detail == "203.0.113.200 is on local list suspects (203.0.113.128/25)"
    assert str(v.reply) == (
        "451 4.7.1 Client host [203.0.113.200] is on a local block list; try again later"
    )
    v = check(rep, "203.0.113.5")
    assert (v.action, v.reason) == (Action.REJECT, "reputation.local_list")
    assert "abusers (203.0.113.0/24)" in v.detail
    assert str(v.reply) == "554 5.7.1 Client host [203.0.113.5] is on a local block list"
    assert rep.allowlisted("203.0.113.5") is None
    assert silent.received() == 0  # the silent DNSBL would have been asked otherwise


def test_the_learned_score_defers_from_the_threshold_on(
    core: kithmail.Core, dnsbl: Dnsmasq
) -> None:
    rep = layer(core, dnsbl.address, dnsbl=[ZEN], learned_threshold=3)
    core.reputation.record(CLEAN, "spam", 1000, n=2)
    core.reputation.record(CLEAN, "ham", 1000, n=50)  # good mail does not count
    core.reputation.record("198.51.100.2", "spam", 1000, n=10)  # a neighbour's does not
    assert check(rep, CLEAN).reason == "reputation.clean"
    core.reputation.record(CLEAN, "virus", 1001)
    v = check(rep, CLEAN)
    assert (v.action, v.reason) == (Action.DEFER, "reputation.learned")
    assert v.detail == "198.51.100.1 scored 3 (threshold 3) from spam=2, virus=1"
    assert str(v.reply) == (
        "451 4.7.1 Client host [198.51.100.1] has a poor reputation here; try again later"
    )


def test_a_learned_reject_is_configured_and_asks_no_dnsbl(
    core: kithmail.Core, silent: SilentServer
) -> None:
    core.reputation.record(CLEAN, "spam", 1000, n=5)
    rep = layer(core, silent.address, dnsbl=[ZEN], learned_threshold=5, learned_action="reject")
    v = check(rep, CLEAN)
    assert (v.action, v.reason) == (Action.REJECT, "reputation.learned")
    assert str(v.reply).startswith("554 5.7.1 ")
    assert silent.received() == 0


def test_the_more_severe_of_dnsbl_and_learned_wins(core: kithmail.Core, dnsbl: Dnsmasq) -> None:
    core.reputation.record(LISTED, "spam", 1000, n=5)
    v = check(layer(core, dnsbl.address, dnsbl=[ZEN], learned_threshold=5), LISTED)
    assert (v.action, v.reason) == (Action.REJECT, "reputation.dnsbl")
    v = check(layer(core, dnsbl.address, dnsbl=[ZEN], learned_threshold=5, on_listed="tag"), LISTED)
    assert (v.action, v.reason) == (Action.DEFER, "reputation.learned")


def test_shadow_mode_decides_the_same_and_does_not_act(core: kithmail.Core, dnsbl: Dnsmasq) -> None:
    enforce = check(layer(core, dnsbl.address, dnsbl=[ZEN]), LISTED)
    shadow = check(layer(core, dnsbl.address, dnsbl=[ZEN], mode="shadow"), LISTED)
    assert shadow == enforce.in_shadow()
    assert (shadow.action, shadow.shadow, shadow.acts) == (Action.REJECT, True, False)
    core.reputation.load("partners", "allow", [LISTED + "/32"], action="accept")
    rep = layer(core, dnsbl.address, dnsbl=[ZEN], mode="shadow")
    v = rep.allowlisted(LISTED)
    assert v is not None and v.shadow and v.reason == "reputation.allowlisted"
    assert not rep.skips_recon(LISTED)  # shadow mode does not exempt from Recon


def test_no_dnsbl_configured_asks_nothing(core: kithmail.Core, silent: SilentServer) -> None:
    v = check(layer(core, silent.address), LISTED)
    assert (v.action, v.reason) == (Action.ACCEPT, "reputation.clean")
    assert silent.received() == 0
