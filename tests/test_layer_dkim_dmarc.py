"""Layer 3 at the end of DATA: DKIM, DMARC, ARC and own domains, with real DNS.

A real dnsmasq serves the keys and policy records of `auth_zones.py` (a
2048-bit key as one long string and as strings split by us, a revoked key,
a malformed key, DMARC records of every policy); `slow.test` is forwarded
to a socket that never answers. Messages are signed and ARC-sealed with
dkimpy in the tests, as a sending server would. The SPF results are put in
`ctx.auth` as the RCPT-time SPF check would have left them.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from auth_zones import arc_seal, auth_dns, message, sign
from dns_server import Dnsmasq, SilentServer

from kithmail import config
from kithmail.dns import Resolver
from kithmail.layers import Action, Layer, SmtpReply, Verdict
from kithmail.layers.spoofing import (
    ArcResult,
    AuthResults,
    DkimResult,
    DmarcResult,
    SpfResult,
    Spoofing,
)
from kithmail.layers.spoofing import dmarc as dmarc_mod
from kithmail.pipeline import MessageContext
from kithmail.tenants import TenantPolicy

OUTSIDE = "192.0.2.1"
LOCAL = ("example.test", "corp.test")


@pytest.fixture
def zones(tmp_path: Path, silent: SilentServer) -> Iterator[Dnsmasq]:
    with auth_dns(tmp_path, silent) as server:
        yield server


def check(
    dns: Dnsmasq,
    msg: bytes,
    *,
    mail_from: str = "bounce@relay.test",
    spf: SpfResult | None = None,
    client_ip: str = OUTSIDE,
    **sections: Any,
) -> tuple[Verdict, AuthResults]:
    """Run the layer on `msg` as the listener would at the end of DATA."""
    settings = config.from_mapping(
        {
            "dns": {"nameservers": [dns.address], "timeout": "500ms"},
            "domains": {"local": list(LOCAL)},
            **sections,
        }
    )
    lines = msg.splitlines(keepends=True)
    end = lines.index(b"\r\n")
    ctx = MessageContext(
        policy=TenantPolicy("default", settings),
        client_ip=client_ip,
        helo="mx.relay.test",
        mail_from=mail_from,
        recipients=("bob@example.test",),
        header=tuple(lines[:end]),
        data=lines,
        auth=AuthResults(spf_mailfrom=spf),
        local_domains=frozenset(LOCAL),
    )
    layer = Spoofing(Resolver.from_settings(settings.dns))
    verdict = asyncio.run(layer.message(ctx))
    assert verdict.layer is Layer.SPOOFING
    return verdict, ctx.auth


def spf_pass(domain: str) -> SpfResult:
    return SpfResult("mailfrom", domain, "pass", OUTSIDE)


def dkim_of(auth: AuthResults) -> list[tuple[str, str, str, str]]:
    return [(d.result, d.domain, d.selector, d.reason) for d in auth.dkim]


REJECT_DMARC = SmtpReply(
    550, "5.7.1", "Unauthenticated mail from bank.test is refused by its DMARC policy"
)


# ---------------------------------------------------------------- DKIM


@pytest.mark.parametrize("selector", ["k1", "k2"])
def test_a_good_2048_bit_signature_passes_and_dmarc_with_it(zones: Dnsmasq, selector: str) -> None:
    """k1 is one long string dnsmasq splits itself; k2 is split by us at 100 bytes."""
    v, auth = check(zones, sign(message(), "bank.test", selector))
    assert (v.action, v.reason) == (Action.ACCEPT, "dmarc.pass")
    assert dkim_of(auth) == [("pass", "bank.test", selector, "")]
    assert auth.dmarc is not None
    assert (auth.dmarc.result, auth.dmarc.dkim_aligned, auth.dmarc.policy) == (
        "pass",
        True,
        "reject",
    )
    assert auth.header_from == "ann@bank.test"
    assert ("TXT", f"{selector}._domainkey.bank.test") in [(t, n) for t, n, _ in zones.queries()]


def test_no_signature_is_dkim_none(zones: Dnsmasq) -> None:
    v, auth = check(zones, message(from_="x@nodmarc.test"))
    assert dkim_of(auth) == [("none", "", "", "")]
    assert (v.action, v.reason) == (Action.ACCEPT, "dmarc.none")
    assert "\tdkim=none;" in auth.header("mx.example.test")


def test_a_signature_broken_by_a_changed_header_fails_and_is_quarantined(zones: Dnsmasq) -> None:
    forged = sign(message(), "bank.test").replace(b"Quarterly figures", b"Quarterly figures!")
    v, auth = check(zones, forged, dmarc={"enforce": False})
    assert dkim_of(auth) == [("fail", "bank.test", "k1", "signature did not verify")]
    assert (v.action, v.reason) == (Action.QUARANTINE, "dkim.fail")
    assert "nothing else authenticates" in v.detail


def test_a_changed_body_is_a_body_hash_failure(zones: Dnsmasq) -> None:
    forged = sign(message(), "bank.test").replace(b"attached", b"attached: pay now")
    _, auth = check(zones, forged)
    assert dkim_of(auth) == [("fail", "bank.test", "k1", "body hash did not verify")]


def test_dkim_fail_acts_only_when_nothing_else_authenticates(zones: Dnsmasq) -> None:
    forged = sign(message(), "bank.test").replace(b"Quarterly", b"Quarterlx")
    v, _ = check(
        zones,
        forged,
        mail_from="bounce@relay.test",
        spf=spf_pass("relay.test"),
        dmarc={"enforce": False},
    )
    assert (v.action, v.reason) == (Action.ACCEPT, "dmarc.fail")
    assert not v.acts


def test_dkim_fail_reject_is_configurable(zones: Dnsmasq) -> None:
    forged = sign(message(), "bank.test").replace(b"Quarterly", b"Quarterlx")
    v, _ = check(zones, forged, dkim={"fail": "reject"}, dmarc={"enforce": False})
    assert (v.action, v.reason, v.reply) == (
        Action.REJECT,
        "dkim.fail",
        SmtpReply(550, "5.7.1", "DKIM signature did not verify"),
    )


@pytest.mark.parametrize(
    ("domain", "selector", "result", "reason"),
    [
        ("bank.test", "old", "permerror", "key revoked"),
        ("bank.test", "gone", "permerror", "no key"),
        ("slow.test", "k1", "temperror", "key lookup timed out"),
    ],
)
def test_key_problems_are_told_apart(
    zones: Dnsmasq, domain: str, selector: str, result: str, reason: str
) -> None:
    msg = sign(message(from_=f"x@{domain}"), domain, selector, signer="bank")
    _, auth = check(zones, msg)
    assert dkim_of(auth) == [(result, domain, selector, reason)]


def test_a_malformed_key_is_permerror_with_the_reason(zones: Dnsmasq) -> None:
    _, auth = check(zones, sign(message(), "bank.test", "bad"))
    [d] = auth.dkim
    assert (d.result, d.selector) == ("permerror", "bad")
    assert d.reason.startswith("malformed key")


def test_signatures_over_the_cap_are_not_checked(zones: Dnsmasq) -> None:
    msg = sign(sign(sign(message(), "bank.test"), "shop.test"), "evil.test")
    _, auth = check(zones, msg, dkim={"max_signatures": 2})
    assert dkim_of(auth)[:2] == [
        ("pass", "evil.test", "k1", ""),
        ("pass", "shop.test", "k1", ""),
    ]
    [extra] = auth.dkim[2:]
    assert extra.result == "policy"
    assert "1 more signature(s) not checked (max_signatures=2)" in extra.reason
    asked = {n for _, n, _ in zones.queries()}
    assert "k1._domainkey.bank.test" not in asked


def test_dkim_shadow_mode_records_and_does_not_act(zones: Dnsmasq) -> None:
    forged = sign(message(), "bank.test").replace(b"Quarterly", b"Quarterlx")
    v, _ = check(zones, forged, dkim={"mode": "shadow"}, dmarc={"enforce": False})
    assert (v.action, v.reason, v.shadow, v.acts) == (Action.QUARANTINE, "dkim.fail", True, False)


def test_a_garbage_signature_is_permerror_and_the_rest_still_checked(zones: Dnsmasq) -> None:
    good = sign(message(), "bank.test")
    msg = b"DKIM-Signature: v=1; this is not; a=signature\r\n" + good
    v, auth = check(zones, msg)
    assert [d.result for d in auth.dkim] == ["permerror", "pass"]
    assert v.reason == "dmarc.pass"


# ---------------------------------------------------------------- DMARC


def test_relaxed_alignment_passes_a_subdomain_from(zones: Dnsmasq) -> None:
    msg = sign(message(from_="ann@mail.bank.test"), "bank.test")
    v, auth = check(zones, msg)
    assert auth.dmarc is not None
    assert (auth.dmarc.result, auth.dmarc.from_domain, auth.dmarc.org_domain) == (
        "pass",
        "mail.bank.test",
        "bank.test",
    )
    assert v.reason == "dmarc.pass"


def test_strict_dkim_alignment_needs_the_exact_domain(zones: Dnsmasq) -> None:
    relaxed_only = sign(message(from_="x@strict.test"), "mail.strict.test", signer="mail.strict")
    v, auth = check(zones, relaxed_only)
    assert [d.result for d in auth.dkim] == ["pass"]
    assert auth.dmarc is not None
    assert (auth.dmarc.result, auth.dmarc.dkim_aligned) == ("fail", False)
    assert (v.action, v.reason) == (Action.REJECT, "dmarc.reject")
    exact = sign(message(from_="x@strict.test"), "strict.test")
    v, _ = check(zones, exact)
    assert v.reason == "dmarc.pass"


def test_strict_and_relaxed_spf_alignment(zones: Dnsmasq) -> None:
    v, auth = check(
        zones,
        message(from_="x@strict.test"),
        mail_from="b@bounce.strict.test",
        spf=spf_pass("bounce.strict.test"),
    )
    assert auth.dmarc is not None and not auth.dmarc.spf_aligned
    assert v.reason == "dmarc.reject"
    v, auth = check(
        zones, message(), mail_from="b@bounce.bank.test", spf=spf_pass("bounce.bank.test")
    )
    assert auth.dmarc is not None and auth.dmarc.spf_aligned
    assert (v.action, v.reason) == (Action.ACCEPT, "dmarc.pass")
    assert "aligned SPF" in v.detail


def test_p_reject_rejects_with_a_clear_reply(zones: Dnsmasq) -> None:
    v, auth = check(zones, message(), mail_from="x@evil.test", spf=spf_pass("evil.test"))
    assert (v.action, v.reason, v.reply) == (Action.REJECT, "dmarc.reject", REJECT_DMARC)
    assert auth.dmarc == DmarcResult(
        "fail",
        "bank.test",
        "bank.test",
        "reject",
        reason="neither SPF nor DKIM aligned with the From domain",
    )


def test_p_quarantine_and_sp_none(zones: Dnsmasq) -> None:
    v, auth = check(zones, message(from_="x@shop.test"))
    assert (v.action, v.reason) == (Action.QUARANTINE, "dmarc.quarantine")
    v, auth = check(zones, message(from_="x@deals.shop.test"))
    assert auth.dmarc is not None
    assert (auth.dmarc.policy, auth.dmarc.org_domain) == ("none", "shop.test")
    assert (v.action, v.reason) == (Action.ACCEPT, "dmarc.fail")


def test_p_none_accepts_a_failure(zones: Dnsmasq) -> None:
    v, auth = check(zones, message(from_="x@news.test"))
    assert (v.action, v.reason) == (Action.ACCEPT, "dmarc.fail")
    assert auth.dmarc is not None and auth.dmarc.policy == "none"


def test_pct_sampling_is_deterministic_per_message_id(zones: Dnsmasq) -> None:
    ids = [f"<m{i}@half.test>" for i in range(40)]
    inside = next(i for i in ids if dmarc_mod.sample_bucket(i) < 50)
    outside = next(i for i in ids if dmarc_mod.sample_bucket(i) >= 50)
    for _ in range(2):
        v, _ = check(zones, message(from_="x@half.test", message_id=inside))
        assert (v.action, v.reason) == (Action.REJECT, "dmarc.reject")
        v, auth = check(zones, message(from_="x@half.test", message_id=outside))
        assert (v.action, v.reason) == (Action.QUARANTINE, "dmarc.quarantine")
        assert auth.dmarc is not None
        assert auth.dmarc.reason == "pct=50: not sampled, reject applied as quarantine"


def test_a_dmarc_lookup_timeout_is_temperror_recorded_not_acted_on(zones: Dnsmasq) -> None:
    """slow.test's server never answers: the policy is unknown, and that alone
    is no reason to refuse (SPF's temperror at RCPT acts on a broken DNS)."""
    v, auth = check(zones, message(from_="x@slow.test"))
    assert auth.dmarc is not None
    assert (auth.dmarc.result, auth.dmarc.reason) == (
        "temperror",
        "_dmarc.slow.test lookup timed out",
    )
    assert (v.action, v.reason, v.reply) == (Action.ACCEPT, "dmarc.temperror", None)
    assert "dmarc=temperror" in auth.header("mx.example.test")


def test_an_aligned_key_timeout_under_a_strict_policy_defers(zones: Dnsmasq) -> None:
    """The signature might have passed: neither refuse nor accept it unverified."""
    msg = sign(message(from_="x@keyslow.test"), "keyslow.test", signer="bank")
    v, auth = check(zones, msg)
    assert dkim_of(auth) == [("temperror", "keyslow.test", "k1", "key lookup timed out")]
    assert auth.dmarc is not None
    assert (auth.dmarc.result, auth.dmarc.policy) == ("temperror", "reject")
    assert (v.action, v.reason, v.reply) == (
        Action.DEFER,
        "dmarc.temperror",
        SmtpReply(451, "4.4.3", "Could not verify the sender's DKIM signature; try again later"),
    )


def test_a_bad_record_is_permerror_and_no_record_is_none(zones: Dnsmasq) -> None:
    v, auth = check(zones, message(from_="x@broken.test"))
    assert auth.dmarc is not None
    assert (auth.dmarc.result, auth.dmarc.reason) == (
        "permerror",
        "no valid p= in the DMARC record",
    )
    assert (v.action, v.reason) == (Action.ACCEPT, "dmarc.permerror")
    # _dmarc.evil.test holds only a TXT record that is not DMARC.
    v, auth = check(zones, message(from_="x@evil.test"))
    assert auth.dmarc is not None and auth.dmarc.result == "none"


def test_a_display_name_that_looks_like_a_domain_is_not_the_address(zones: Dnsmasq) -> None:
    msg = sign(message(from_='"paypal.com" <x@evil.test>'), "evil.test")
    v, auth = check(zones, msg)
    assert auth.header_from == "x@evil.test"
    assert auth.dmarc is not None and auth.dmarc.from_domain == "evil.test"
    assert v.reason == "dkim.pass"
    msg = message(from_='"ann@bank.test" (bank.test) <x@evil.test>')
    _, auth = check(zones, msg)
    assert auth.header_from == "x@evil.test"
    assert not any(n.rpartition("_dmarc.")[2] == "bank.test" for _, n, _ in zones.queries())


@pytest.mark.parametrize(
    ("froms", "problem"),
    [
        ((), "no From field"),
        (("ann@bank.test", "x@evil.test"), "2 From fields"),
        (("ann@bank.test, x@evil.test",), "From addresses of several domains"),
        (("undisclosed-recipients:;",), "no address in the From field"),
    ],
)
def test_zero_or_several_from_addresses_are_rejected(
    zones: Dnsmasq, froms: Sequence[str], problem: str
) -> None:
    if froms:
        msg = message(from_=froms)
    else:  # a signed message whose From field is then removed
        lines = sign(message(), "bank.test").splitlines(keepends=True)
        msg = b"".join(line for line in lines if not line.startswith(b"From:"))
    v, auth = check(zones, msg)
    assert (v.action, v.reason) == (Action.REJECT, "dmarc.bad_from")
    assert v.reply is not None and v.reply.code == 550 and v.reply.status == "5.7.1"
    assert auth.dmarc is not None
    assert (auth.dmarc.result, auth.dmarc.reason) == ("permerror", problem)
    assert auth.header_from == ""


def test_two_addresses_of_one_domain_are_evaluated_once(zones: Dnsmasq) -> None:
    msg = sign(message(from_="ann@bank.test, bo@bank.test"), "bank.test")
    v, auth = check(zones, msg)
    assert v.reason == "dmarc.pass"
    assert auth.header_from == ""  # not one single address


def test_enforce_false_and_shadow_mode(zones: Dnsmasq) -> None:
    v, _ = check(zones, message(), dmarc={"enforce": False})
    assert (v.action, v.reason) == (Action.ACCEPT, "dmarc.fail")
    assert "not enforced" in v.detail
    v, _ = check(zones, message(), dmarc={"mode": "shadow"})
    assert (v.action, v.reason, v.shadow, v.acts) == (Action.REJECT, "dmarc.reject", True, False)


# ---------------------------------------------------------------- ARC


def forwarded(sealer: str) -> bytes:
    """bank.test's signed message, its Subject tagged by a list, then ARC-sealed."""
    signed = sign(message(), "bank.test")
    tagged = signed.replace(b"Subject: Quarterly", b"Subject: [staff] Quarterly")
    return arc_seal(tagged, sealer, "dkim=pass header.d=bank.test; spf=pass")


def test_a_trusted_arc_sealer_overrides_a_dmarc_fail(zones: Dnsmasq) -> None:
    v, auth = check(
        zones,
        forwarded("lists.test"),
        mail_from="bounce@lists.test",
        spf=spf_pass("lists.test"),
        arc={"trusted_sealers": ["lists.test"]},
    )
    assert (v.action, v.reason) == (Action.ACCEPT, "dmarc.arc_override")
    assert "sealer lists.test is in [arc] trusted_sealers" in v.detail
    assert auth.arc == ArcResult("pass", "lists.test", 1)
    assert auth.dmarc is not None and auth.dmarc.result == "fail"
    assert "overridden: ARC pass sealed by trusted lists.test" in auth.dmarc.reason
    assert [d.result for d in auth.dkim] == ["fail"]


def test_an_untrusted_sealer_does_not_override(zones: Dnsmasq) -> None:
    v, auth = check(
        zones,
        forwarded("relay.test"),
        mail_from="bounce@relay.test",
        spf=spf_pass("relay.test"),
        arc={"trusted_sealers": ["lists.test"]},
    )
    assert auth.arc is not None and (auth.arc.result, auth.arc.sealer) == ("pass", "relay.test")
    assert (v.action, v.reason, v.reply) == (Action.REJECT, "dmarc.reject", REJECT_DMARC)


def test_a_chain_changed_after_sealing_fails_and_overrides_nothing(zones: Dnsmasq) -> None:
    msg = forwarded("lists.test").replace(b"the figures", b"the new bank details")
    v, auth = check(zones, msg, arc={"trusted_sealers": ["lists.test"]})
    assert auth.arc is not None and auth.arc.result == "fail"
    assert v.reason == "dmarc.reject"


def test_arc_sets_over_the_cap_fail(zones: Dnsmasq) -> None:
    twice = arc_seal(forwarded("lists.test"), "relay.test", "arc=pass")
    _, auth = check(zones, twice, arc={"max_sets": 2})
    assert auth.arc == ArcResult("pass", "relay.test", 2)
    _, auth = check(zones, twice, arc={"max_sets": 1})
    assert auth.arc is not None
    assert (auth.arc.result, auth.arc.reason) == ("fail", "more than max_sets=1 ARC sets")


# ---------------------------------------------------------------- own domains


OWN_REPLY = SmtpReply(
    550, "5.7.1", "Mail from example.test must be authenticated by its own servers"
)


def test_own_domain_from_outside_without_dmarc_is_rejected(zones: Dnsmasq) -> None:
    """The CEO-fraud path: our own domain, no DMARC record, SPF passes for the envelope."""
    msg = message(from_="CEO <ceo@example.test>")
    v, auth = check(zones, msg, mail_from="x@evil.test", spf=spf_pass("evil.test"))
    assert auth.dmarc is not None and auth.dmarc.result == "none"
    assert (v.action, v.reason, v.reply) == (Action.REJECT, "spoofing.own_domain", OWN_REPLY)
    assert "header From example.test claims our domain example.test" in v.detail


def test_own_domain_with_p_none_is_still_rejected(zones: Dnsmasq) -> None:
    v, auth = check(zones, message(from_="ceo@corp.test"), spf=spf_pass("relay.test"))
    assert auth.dmarc is not None and (auth.dmarc.result, auth.dmarc.policy) == ("fail", "none")
    assert (v.action, v.reason) == (Action.REJECT, "spoofing.own_domain")


def test_an_own_envelope_sender_must_authenticate_too(zones: Dnsmasq) -> None:
    msg = sign(message(from_="x@evil.test"), "evil.test")
    spf = SpfResult("mailfrom", "example.test", "fail", OUTSIDE)
    v, _ = check(zones, msg, mail_from="ceo@example.test", spf=spf)
    assert v.reason == "spoofing.own_domain"
    assert "envelope sender example.test" in v.detail


def test_own_domain_in_shadow_mode_is_recorded_not_enforced(zones: Dnsmasq) -> None:
    msg = message(from_="CEO <ceo@example.test>")
    v, _ = check(zones, msg, mail_from="x@evil.test", spoofing={"mode": "shadow"})
    assert (v.action, v.reason, v.shadow, v.acts) == (
        Action.REJECT,
        "spoofing.own_domain",
        True,
        False,
    )


def test_a_subdomain_of_ours_is_ours(zones: Dnsmasq) -> None:
    v, _ = check(zones, message(from_="it@branch.example.test"))
    assert v.reason == "spoofing.own_domain"


@pytest.mark.parametrize("how", ["dkim", "spf", "trusted network"])
def test_authenticated_own_mail_passes(zones: Dnsmasq, how: str) -> None:
    msg = message(from_="ceo@example.test")
    if how == "dkim":
        v, _ = check(zones, sign(msg, "example.test"))
        assert v.reason == "dkim.pass"
    elif how == "spf":
        v, _ = check(zones, msg, mail_from="ceo@example.test", spf=spf_pass("example.test"))
        assert v.reason == "dmarc.none"
    else:
        v, _ = check(zones, msg, client_ip="127.0.0.1")
        assert v.reason == "dmarc.none"
    assert v.action is Action.ACCEPT


def test_own_domains_action_is_configurable(zones: Dnsmasq) -> None:
    v, _ = check(zones, message(from_="ceo@example.test"), spoofing={"own_domains": "quarantine"})
    assert (v.action, v.reason, v.reply) == (Action.QUARANTINE, "spoofing.own_domain", None)


# ---------------------------------------------------------------- Authentication-Results


_QS = r'"(?:[^"\\]|\\.)*"'
_TOKEN = r"[^\s()<>@,;:\\\"/\[\]?=]+"


def parse_ar(value: str) -> tuple[str, list[tuple[str, str, dict[str, str]]]]:
    """A small RFC 8601 reader: (authserv-id, [(method, result, {ptype.prop|reason: value})]).

    Written independently of the code under test: it unfolds, drops
    comments, and splits resinfos at semicolons outside quoted strings.
    """
    assert "\n" not in value.replace("\r\n\t", "").replace("\r\n ", "")
    text = value.replace("\r\n", "")
    text = re.sub(rf"({_QS})|\([^()]*\)", lambda m: m.group(1) or " ", text)
    parts = re.findall(rf"(?:{_QS}|[^;\"])+", text)
    authserv, results = parts[0].strip(), []
    for part in parts[1:]:
        m = re.fullmatch(rf"\s*([\w-]+)=(\w+)((?:\s+[\w.-]+=(?:{_QS}|{_TOKEN}))*)\s*", part)
        assert m, f"not a resinfo: {part!r}"
        props = {
            k: (re.sub(r"\\(.)", r"\1", v[1:-1]) if v.startswith('"') else v)
            for k, v in re.findall(rf"([\w.-]+)=({_QS}|{_TOKEN})", m.group(3))
        }
        results.append((m.group(1), m.group(2), props))
    return authserv, results


def test_the_header_of_a_forwarded_message(zones: Dnsmasq) -> None:
    _, auth = check(
        zones,
        forwarded("lists.test"),
        mail_from="bounce@lists.test",
        spf=spf_pass("lists.test"),
        arc={"trusted_sealers": ["lists.test"]},
    )
    value = auth.header("mx.example.test")
    authserv, results = parse_ar(value)
    assert authserv == "mx.example.test"
    assert [(m, r) for m, r, _ in results] == [
        ("spf", "pass"),
        ("dkim", "fail"),
        ("dmarc", "fail"),
        ("arc", "pass"),
    ]
    assert results[1][2] == {
        "reason": "signature did not verify",
        "header.d": "bank.test",
        "header.s": "k1",
    }
    assert results[2][2]["header.from"] == "bank.test"
    assert all(len(line) <= 78 for line in value.split("\r\n")[:-1] if "reason=" not in line)


def test_hostile_signature_domains_stay_inside_their_quotes(zones: Dnsmasq) -> None:
    hostile = b'DKIM-Signature: v=1; a=rsa-sha256; d=evil.test"; dkim=pass; x="; s=k1;\r\n h=from; bh=AAAA; b=AAAA\r\n'
    _, auth = check(zones, hostile + message(from_="x@nodmarc.test"))
    [d] = auth.dkim
    assert d.result == "permerror"
    _, results = parse_ar(auth.header("mx.example.test"))
    assert [(m, r) for m, r, _ in results] == [
        ("dkim", "permerror"),
        ("dmarc", "none"),
        ("arc", "none"),
    ]
    assert results[0][2]["header.d"] == 'evil.test"'


@pytest.mark.parametrize(
    "evil",
    [
        'evil.test"; dkim=pass header.d=bank.test',
        "evil.test\r\nAuthentication-Results: mx.example.test; dmarc=pass",
        "evil.test; dmarc=pass (a comment",
        "back\\slash\\",
        "ev\x00il\x7f.test",
        "x" * 2000,
    ],
)
def test_header_escapes_hostile_values(evil: str) -> None:
    auth = AuthResults(
        spf_mailfrom=SpfResult("mailfrom", evil, "fail", detail=evil),
        dkim=[DkimResult("fail", evil, evil, evil)],
        dmarc=DmarcResult("fail", evil, evil, "reject", reason=evil),
        arc=ArcResult("fail", evil, 1, evil),
        header_from=evil,
    )
    value = auth.header("mx.example.test")
    assert value.isascii()
    assert all(line[:1] in (" ", "\t") for line in value.split("\r\n")[1:])
    assert all(len(line) < 998 for line in value.split("\r\n"))
    authserv, results = parse_ar(value)
    assert authserv == "mx.example.test"
    assert [(m, r) for m, r, _ in results] == [
        ("spf", "fail"),
        ("dkim", "fail"),
        ("dmarc", "fail"),
        ("arc", "fail"),
    ]
    shown = "".join(c if " " <= c <= "~" else "?" for c in evil)
    shown = shown if len(shown) <= 255 else shown[:252] + "..."
    assert results[1][2]["header.d"] == shown
    assert results[2][2]["reason"] == shown


def test_header_units() -> None:
    assert AuthResults().header("mx.example.test") == "mx.example.test; none"
    assert AuthResults().header("odd id;") == '"odd id;"; none'
    auth = AuthResults(
        spf_mailfrom=SpfResult("mailfrom", "bücher.test", "pass"),
        spf_helo=SpfResult("helo", "mx.bücher.test", "none"),
        dkim=[DkimResult("pass", "Bank.Test", "k1")],
        dmarc=DmarcResult("pass", "bank.test", "bank.test", "reject", False, True),
    )
    assert auth.header("mx.example.test") == (
        "mx.example.test;\r\n"
        "\tspf=pass smtp.mailfrom=xn--bcher-kva.test;\r\n"
        "\tspf=none smtp.helo=mx.xn--bcher-kva.test;\r\n"
        "\tdkim=pass header.d=bank.test header.s=k1;\r\n"
        "\tdmarc=pass (p=reject) header.from=bank.test"
    )
    assert auth.summary() == "spf=pass dkim=pass:Bank.Test dmarc=pass:bank.test:p=reject"
    assert AuthResults().summary() == "spf=none dkim=none"


def test_summary_is_one_printable_line() -> None:
    auth = AuthResults(dkim=[DkimResult("fail", "a\r\nb.test")])
    assert auth.summary() == "spf=none dkim=fail:a??b.test"


# ---------------------------------------------------------------- units: From, records, PSL


@pytest.mark.parametrize(
    ("field", "addresses", "problem"),
    [
        ("Ann <ann@Bank.TEST>", [("ann", "bank.test")], ""),
        ('"paypal.com" <x@evil.test>', [("x", "evil.test")], ""),
        ('"x@paypal.com, y@bank.test" <x@evil.test>', [("x", "evil.test")], ""),
        ("x@evil.test (ceo@bank.test)", [("x", "evil.test")], ""),
        ('"a@b"@evil.test', [('"a@b"', "evil.test")], ""),
        ("Staff: ann@bank.test, bo@bank.test;", [("ann", "bank.test"), ("bo", "bank.test")], ""),
        ("ann@bücher.test", [("ann", "xn--bcher-kva.test")], ""),
        ("<@relay.test:ann@bank.test>", [("ann", "bank.test")], ""),
        ('"unterminated <x@evil.test>', [], "the From field does not parse"),
        ("x@evil.test (open comment", [], "the From field does not parse"),
        ("<x@evil.test", [], "the From field does not parse"),
        ("x@[192.0.2.1]", [], "a From address without a valid domain"),
        ("x@bank.test;evil.test", [("x", "bank.test")], "a From address without a valid domain"),
        ("nobody", [], "a From address without a valid domain"),
    ],
)
def test_from_parser(field: str, addresses: list[tuple[str, str]], problem: str) -> None:
    a = dmarc_mod.author([f"From: {field}\r\n".encode()])
    assert a.problem == problem
    if not problem:
        assert list(a.addresses) == addresses


def test_a_folded_from_field_is_unfolded() -> None:
    a = dmarc_mod.author([b"Subject: x\r\n", b"From: Ann\r\n", b" <ann@bank.test>\r\n"])
    assert (a.address, a.domain) == ("ann@bank.test", "bank.test")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v=DMARC1; p=reject", dmarc_mod.Record("reject")),
        (
            "v=DMARC1;p=quarantine;sp=none;pct=20;adkim=s;aspf=s;rua=mailto:a@b.test;",
            dmarc_mod.Record("quarantine", "none", 20, "s", "s"),
        ),
        ("v=DMARC1; p=REJECT; pct=500; sp=bogus; adkim=x", dmarc_mod.Record("reject", None, 100)),
        ("v=DMARC1; p=bogus; rua=mailto:d@bank.test", dmarc_mod.Record("none")),
        ("v=DMARC1; p=bogus", "no valid p= in the DMARC record"),
        ("p=reject; v=DMARC1", "the DMARC record does not begin with v=DMARC1"),
        ("v=DMARC1; p=reject; p=none", "the tag p= twice in the DMARC record"),
        ("v=DMARC1; ; p=reject", "an empty tag in the DMARC record"),
        ("v=DMARC1; p reject", "a malformed tag in the DMARC record"),
    ],
)
def test_dmarc_record_parser(text: str, expected: dmarc_mod.Record | str) -> None:
    assert dmarc_mod.parse_record(text) == expected


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("mail.bank.test", "bank.test"),
        ("a.b.example.co.uk", "example.co.uk"),
        ("co.uk", "co.uk"),
        ("someone.github.io", "someone.github.io"),  # a private-section suffix
        ("Deep.Sub.Example.COM.", "example.com"),
    ],
)
def test_organisational_domain_from_the_shipped_list(domain: str, org: str) -> None:
    assert dmarc_mod.org_domain(domain, dmarc_mod.default_psl()) == org
