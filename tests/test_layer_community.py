"""Layer 5 (kithmail.layers.community): who counts as the author, and what each user gets.

The identity rules are DESIGN.md's "The community checks an authenticated
identity", one test per clause, with the `AuthResults` the anti-spoofing
layer would have filled in built here by hand (this layer does no DNS). The
decisions run against a real core in the test's own directory, with the
shipped public suffix list.
"""

from __future__ import annotations

import pytest
from publicsuffixlist import PublicSuffixList

import kithmail
from kithmail import config
from kithmail.layers import Action, Layer, Verdict
from kithmail.layers.community import (
    Community,
    authenticated_identity,
    list_id,
    org_user,
    outcome,
)
from kithmail.layers.spoofing.dmarc import default_psl
from kithmail.layers.spoofing.results import AuthResults, DkimResult, DmarcResult, SpfResult
from kithmail.pipeline import MessageContext
from kithmail.spool import Outcome
from kithmail.tenants import TenantPolicy

PSL: PublicSuffixList = default_psl()
TENANT = "acme"
ANN, BOB, CAROL = "ann@example.test", "bob@example.test", "carol@example.test"


def spf(domain: str, result: str = "pass") -> SpfResult:
    return SpfResult("mailfrom", domain, result, "192.0.2.7")  # type: ignore[arg-type]


def auth(
    header_from: str = "pat@example.com",
    *,
    dmarc: str | None = "none",
    spf_for: SpfResult | None = None,
    dkim: list[DkimResult] | None = None,
    dmarc_reason: str = "",
) -> AuthResults:
    domain = header_from.rpartition("@")[2]
    return AuthResults(
        spf_mailfrom=spf_for,
        dkim=dkim if dkim is not None else [DkimResult("none", "")],
        dmarc=None
        if dmarc is None
        else DmarcResult(dmarc, domain, PSL.privatesuffix(domain) or domain, reason=dmarc_reason),  # type: ignore[arg-type]
        header_from=header_from,
    )


def who(a: AuthResults, require_auth: bool = True) -> str | None:
    return authenticated_identity(a, require_auth=require_auth, psl=PSL)[0]


# ---------------------------------------------------------------- the identity


def test_dmarc_pass_authenticates() -> None:
    a = auth(dmarc="pass", spf_for=spf("example.com"))
    ident, why = authenticated_identity(a, require_auth=True, psl=PSL)
    assert ident == "pat@example.com"
    assert why == "DMARC pass for example.com"


def test_identity_is_folded_as_the_table_folds() -> None:
    assert who(auth("Pat.Smith@example.com", dmarc="pass")) == "pat.smith@example.com"


def test_no_dmarc_spf_pass_of_the_same_organisation() -> None:
    ident, why = authenticated_identity(
        auth(dmarc="none", spf_for=spf("bounces.example.com")), require_auth=True, psl=PSL
    )
    assert ident == "pat@example.com"
    assert "SPF pass" in why and "bounces.example.com" in why


def test_no_dmarc_spf_pass_of_another_organisation_is_not_enough() -> None:
    ident, why = authenticated_identity(
        auth(dmarc="none", spf_for=spf("esp.example.net")), require_auth=True, psl=PSL
    )
    assert ident is None
    assert "no DMARC record for example.com" in why


def test_same_organisation_means_the_public_suffix_list_not_the_last_two_labels() -> None:
    # example.co.uk and evil.co.uk share "co.uk", a public suffix: two organisations.
    a = auth("pat@example.co.uk", dmarc="none", spf_for=spf("evil.co.uk"))
    assert who(a) is None
    a = auth("pat@example.co.uk", dmarc="none", spf_for=spf("mail.example.co.uk"))
    assert who(a) == "pat@example.co.uk"


def test_no_dmarc_dkim_of_that_domain() -> None:
    assert who(auth(dmarc="none", dkim=[DkimResult("pass", "example.com", "s1")])) == (
        "pat@example.com"
    )
    # A signature of a subdomain is the same organisation (relaxed, as DMARC's default).
    assert who(auth(dmarc="none", dkim=[DkimResult("pass", "mail.example.com", "s1")])) == (
        "pat@example.com"
    )


def test_no_dmarc_dkim_of_another_domain_or_broken_is_not_enough() -> None:
    assert who(auth(dmarc="none", dkim=[DkimResult("pass", "example.net", "s1")])) is None
    assert who(auth(dmarc="none", dkim=[DkimResult("fail", "example.com", "s1")])) is None


@pytest.mark.parametrize("result", ["fail", "temperror", "permerror"])
def test_dmarc_other_than_pass_or_none_never_authenticates(result: str) -> None:
    # Even with an SPF pass and a DKIM pass of the domain's organisation: a
    # DMARC fail means they were not aligned as the domain asked.
    a = auth(
        dmarc=result,
        spf_for=spf("example.com"),
        dkim=[DkimResult("pass", "example.com")],
        dmarc_reason="strict alignment",
    )
    for require in (True, False):
        ident, why = authenticated_identity(a, require_auth=require, psl=PSL)
        assert ident is None
        assert why.startswith(f"DMARC {result} for example.com")


def test_forged_member_spf_fail_is_unknown() -> None:
    a = auth(dmarc="none", spf_for=spf("example.com", "fail"))
    for require in (True, False):
        assert who(a, require) is None


def test_forged_member_unaligned_from_is_unknown() -> None:
    # The envelope is the forger's own, and passes; the From claims a member.
    a = auth(dmarc="fail", spf_for=spf("evil.example.org"), dmarc_reason="not aligned")
    assert who(a) is None
    assert who(a, require_auth=False) is None


def test_require_auth_false_counts_none_and_neutral() -> None:
    assert who(auth(dmarc="none"), require_auth=True) is None
    ident, why = authenticated_identity(auth(dmarc="none"), require_auth=False, psl=PSL)
    assert ident == "pat@example.com"
    assert why.startswith("require_auth = false")
    assert who(auth(dmarc="none", spf_for=spf("example.com", "neutral")), False) is not None
    assert who(auth(dmarc="none", spf_for=spf("example.com", "none")), False) is not None
    # Another organisation's SPF pass says nothing about the From, as none says nothing.
    assert who(auth(dmarc="none", spf_for=spf("esp.example.net")), False) is not None


@pytest.mark.parametrize("result", ["fail", "softfail", "temperror", "permerror"])
def test_require_auth_false_never_counts_failures(result: str) -> None:
    ident, why = authenticated_identity(
        auth(dmarc="none", spf_for=spf("example.com", result)), require_auth=False, psl=PSL
    )
    assert ident is None
    assert f"SPF {result}" in why


def test_require_auth_false_never_counts_a_broken_signature_of_the_domain() -> None:
    a = auth(dmarc="none", dkim=[DkimResult("fail", "example.com", "s1", "body hash")])
    assert who(a, require_auth=False) is None
    # A broken signature of someone else is not about this identity.
    a = auth(dmarc="none", dkim=[DkimResult("fail", "example.net", "s1", "body hash")])
    assert who(a, require_auth=False) == "pat@example.com"


def test_no_from_or_no_dmarc_evaluation_is_unauthenticated() -> None:
    assert authenticated_identity(auth(""), require_auth=False, psl=PSL) == (
        None,
        "no single header From address",
    )
    ident, why = authenticated_identity(auth(dmarc=None), require_auth=False, psl=PSL)
    assert ident is None and "not evaluated" in why


def test_a_from_no_entry_can_name_is_unauthenticated() -> None:
    ident, why = authenticated_identity(
        auth('"pat smith"@example.com', dmarc="pass"), require_auth=True, psl=PSL
    )
    assert ident is None and "cannot be a community entry" in why


def test_list_id_parsing() -> None:
    assert list_id([b"List-Id: News <News.Example.ORG>\r\n", b"\r\n"]) == "news.example.org"
    assert list_id([b"List-Id: news.example.org\r\n"]) == "news.example.org"
    assert list_id([b"List-Id:\r\n", b" Folded <a.b.example>\r\n"]) == "a.b.example"
    assert list_id([b"Subject: x\r\n"]) is None
    assert list_id([b"List-Id: <nodots>\r\n"]) is None
    assert list_id([b"List-Id: <a b.example>\r\n"]) is None
    assert list_id([b"List-Id: <a.example>\r\n", b"List-Id: <b.example>\r\n"]) is None
    # After the header block, a List-Id line is body text.
    assert list_id([b"Subject: x\r\n", b"\r\n", b"List-Id: <a.example>\r\n"]) is None


# ---------------------------------------------------------------- decisions


def ctx(
    a: AuthResults,
    *,
    list_header: str | None = None,
    tenant: str = TENANT,
    require_auth: bool = True,
    users: tuple[str, ...] = (ANN,),
) -> MessageContext:
    settings = config.Settings(community=config.Community(require_auth=require_auth))
    header = [f"From: Pat <{a.header_from}>\r\n".encode(), b"Subject: hello\r\n"]
    if list_header is not None:
        header.append(f"List-Id: {list_header}\r\n".encode())
    return MessageContext(
        TenantPolicy(tenant, settings),
        "192.0.2.7",
        "mail.example.com",
        "pat@example.com",
        users,
        tuple(header),
        [*header, b"\r\n", b"body\r\n"],
        auth=a,
    )


def one(c: Community, context: MessageContext, user: str = ANN) -> Verdict:
    [v] = c.decide(context, [user])
    assert v.layer is Layer.COMMUNITY
    return v


def test_member_is_delivered(core: kithmail.Core) -> None:
    core.community.add(ANN, "pat@example.com", "allow", "outbound", 1)
    v = one(Community(core, psl=PSL), ctx(auth(dmarc="pass")))
    assert (v.action, v.reason) == (Action.ACCEPT, "community.member")
    assert "pat@example.com (DMARC pass for example.com)" in v.detail
    assert "ann@example.test's allow list (source outbound)" in v.detail


def test_blocked_is_discarded(core: kithmail.Core) -> None:
    core.community.add(ANN, "@example.com", "block", "manual", 1)
    v = one(Community(core, psl=PSL), ctx(auth(dmarc="pass")))
    assert (v.action, v.reason) == (Action.DISCARD, "community.blocked")
    assert "blocked by @example.com" in v.detail


def test_stranger_is_held(core: kithmail.Core) -> None:
    v = one(Community(core, psl=PSL), ctx(auth(dmarc="pass")))
    assert (v.action, v.reason) == (Action.QUARANTINE, "community.unknown")
    assert v.detail == (
        "unknown: pat@example.com (DMARC pass for example.com) is not in the community of "
        "ann@example.test"
    )


def test_forged_member_is_held_not_delivered(core: kithmail.Core) -> None:
    core.community.add(ANN, "pat@example.com", "allow", "outbound", 1)
    c = Community(core, psl=PSL)
    for a in (
        auth(dmarc="none", spf_for=spf("example.com", "fail")),
        auth(dmarc="fail", spf_for=spf("evil.example.org"), dmarc_reason="not aligned"),
    ):
        for require in (True, False):
            v = one(c, ctx(a, require_auth=require))
            assert (v.action, v.reason) == (Action.QUARANTINE, "community.unknown")
            assert v.detail.startswith("unauthenticated: pat@example.com: ")


def test_require_auth_false_lets_an_unchecked_member_through(core: kithmail.Core) -> None:
    core.community.add(ANN, "pat@example.com", "allow", "manual", 1)
    c = Community(core, psl=PSL)
    assert one(c, ctx(auth(dmarc="none"), require_auth=True)).action is Action.QUARANTINE
    v = one(c, ctx(auth(dmarc="none"), require_auth=False))
    assert (v.action, v.reason) == (Action.ACCEPT, "community.member")


def test_organisation_entries(core: kithmail.Core) -> None:
    core.community.add(org_user(TENANT), "@example.com", "allow", "admin", 1)
    c = Community(core, psl=PSL)
    v = one(c, ctx(auth(dmarc="pass")))
    assert (v.action, v.reason) == (Action.ACCEPT, "community.member")
    assert "the organisation's allow list (source admin)" in v.detail
    # Another tenant's organisation list is not this one's.
    assert one(c, ctx(auth(dmarc="pass"), tenant="other")).action is Action.QUARANTINE
    # The user's own block wins over the organisation's allow.
    core.community.add(ANN, "pat@example.com", "block", "manual", 2)
    assert one(c, ctx(auth(dmarc="pass"))).reason == "community.blocked"


def test_list_entry_needs_the_list_domain_to_vouch(core: kithmail.Core) -> None:
    core.community.add(ANN, "list:news.example.org", "allow", "manual", 1)
    c = Community(core, psl=PSL)
    signed = [DkimResult("pass", "example.org", "list"), DkimResult("fail", "example.com")]
    # The author is not authenticated (the list broke the signature), the list is.
    v = one(c, ctx(auth(dmarc="fail", dkim=signed), list_header="News <news.example.org>"))
    assert (v.action, v.reason) == (Action.ACCEPT, "community.member")
    assert "the list news.example.org (DKIM pass for example.org)" in v.detail
    # SPF pass of the list's organisation vouches too.
    a = auth(dmarc="none", spf_for=spf("bounces.example.org"))
    assert one(c, ctx(a, list_header="<news.example.org>")).action is Action.ACCEPT
    # Anyone can write a List-Id: signed by someone else, it matches nothing.
    a = auth(dmarc="pass", dkim=[DkimResult("pass", "example.com")], spf_for=spf("example.com"))
    v = one(c, ctx(a, list_header="<news.example.org>"))
    assert (v.action, v.reason) == (Action.QUARANTINE, "community.unknown")
    a = auth(dmarc="none", dkim=[DkimResult("pass", "evil.example.net")])
    v = one(c, ctx(a, list_header="<news.example.org>"))
    assert (v.action, v.reason) == (Action.QUARANTINE, "community.unknown")
    assert "List-Id news.example.org is not vouched for" in v.detail


def test_a_vouched_list_does_not_make_the_author_a_member(core: kithmail.Core) -> None:
    # ann allows pat, not the list; the list vouches, pat is not authenticated.
    core.community.add(ANN, "pat@example.com", "allow", "manual", 1)
    c = Community(core, psl=PSL)
    a = auth(dmarc="fail", dkim=[DkimResult("pass", "example.org")])
    v = one(c, ctx(a, list_header="<news.example.org>"))
    assert (v.action, v.reason) == (Action.QUARANTINE, "community.unknown")
    assert v.detail.startswith("unauthenticated: ")
    # Nor does an entry for the placeholder the lookup uses match anything.
    core.community.add(ANN, "@unauthenticated.invalid", "allow", "manual", 1)
    assert one(c, ctx(a, list_header="<news.example.org>")).action is Action.QUARANTINE


def test_blocked_list_is_discarded(core: kithmail.Core) -> None:
    core.community.add(org_user(TENANT), "list:promo.example.org", "block", "admin", 1)
    a = auth(dmarc="none", dkim=[DkimResult("pass", "example.org")])
    v = one(Community(core, psl=PSL), ctx(a, list_header="<promo.example.org>"))
    assert (v.action, v.reason) == (Action.DISCARD, "community.blocked")


def test_three_recipients_end_three_ways(core: kithmail.Core) -> None:
    core.community.add(ANN, "pat@example.com", "allow", "outbound", 1)
    core.community.add(BOB, "@example.com", "block", "manual", 1)
    users = (ANN, BOB, CAROL)
    vs = Community(core, psl=PSL).decide(ctx(auth(dmarc="pass"), users=users), users)
    assert [(v.action, v.reason) for v in vs] == [
        (Action.ACCEPT, "community.member"),
        (Action.DISCARD, "community.blocked"),
        (Action.QUARANTINE, "community.unknown"),
    ]
    assert "community of carol@example.test" in vs[2].detail
    # An unauthenticated author: every recipient holds it, member or not.
    a = auth(dmarc="none", spf_for=spf("example.com", "softfail"))
    vs = Community(core, psl=PSL).decide(ctx(a, users=users), users)
    assert [v.reason for v in vs] == ["community.unknown"] * 3


def test_no_recipients_no_verdicts(core: kithmail.Core) -> None:
    assert Community(core, psl=PSL).decide(ctx(auth(dmarc="pass")), []) == []


def test_earlier_layers_stand() -> None:
    member = Verdict(Layer.COMMUNITY, Action.ACCEPT, "community.member")
    blocked = Verdict(Layer.COMMUNITY, Action.DISCARD, "community.blocked")
    unknown = Verdict(Layer.COMMUNITY, Action.QUARANTINE, "community.unknown")
    assert outcome(Outcome.QUARANTINE, member) is Outcome.QUARANTINE
    assert outcome(Outcome.QUARANTINE, blocked) is Outcome.QUARANTINE
    assert outcome(Outcome.DELIVER, member) is Outcome.DELIVER
    assert outcome(Outcome.DELIVER, blocked) is Outcome.DISCARD
    assert outcome(Outcome.DELIVER, unknown) is Outcome.QUARANTINE
    assert outcome(Outcome.DELIVER, unknown.in_shadow()) is Outcome.DELIVER
