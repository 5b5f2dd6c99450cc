"""Layer 3's SPF against a real dnsmasq: every result, both identities, the actions.

Each SPF result comes from a real record served on loopback (temperror
from a nameserver that never answers); the verdict's reason, action and
whole SMTP reply are asserted with the results recorded in AuthResults,
and that nothing the client sent reaches a reply or a log line unescaped.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dns_server import Dnsmasq, SilentServer, StartDnsmasq

from kithmail import config
from kithmail.layers import Action, Layer, Verdict
from kithmail.layers.spoofing import spf as spf_layer
from kithmail.layers.spoofing.results import AuthResults, SpfResult
from kithmail.spf import SpfChecker

GOOD = "192.0.2.5"  # authorised by most test policies
OTHER = "198.51.100.9"  # authorised by none

INCLUDES = [(f"i{n}.example.test", "v=spf1 -all") for n in range(1, 12)]
RECORDS = [
    ("pass.example.test", "v=spf1 ip4:192.0.2.0/24 -all"),
    ("fail.example.test", "v=spf1 -all"),
    ("soft.example.test", "v=spf1 ~all"),
    ("neutral.example.test", "v=spf1 ?all"),
    ("none.example.test", "not an SPF record"),
    ("syntax.example.test", "v=spf1 ip4:999.1.1.1 -all"),
    ("unknown.example.test", "v=spf1 frobnicate -all"),
    ("inc.example.test", "v=spf1 include:pass.example.test -all"),
    ("redir.example.test", "v=spf1 redirect=pass.example.test"),
    ("helo.example.test", "v=spf1 ip4:192.0.2.0/24 -all"),
    ("mx.example.test", "v=spf1 mx -all"),
    ("manymx.example.test", "v=spf1 mx -all"),
    # RFC 7208 §4.6.4: 10 DNS-querying terms are allowed, the 11th is permerror.
    ("ten.example.test", "v=spf1 " + " ".join(f"include:{n}" for n, _ in INCLUDES[:10]) + " -all"),
    ("eleven.example.test", "v=spf1 " + " ".join(f"include:{n}" for n, _ in INCLUDES) + " -all"),
    # ... and 2 void lookups, the 3rd is permerror.
    ("twovoid.example.test", "v=spf1 a:nx1.example.test a:nx2.example.test -all"),
    (
        "threevoid.example.test",
        "v=spf1 a:nx1.example.test a:nx2.example.test a:nx3.example.test -all",
    ),
    *INCLUDES,
]
A = [("mail.example.test", GOOD), *((f"mx{n}.example.test", "203.0.113.1") for n in range(11))]
MX = [
    ("mx.example.test", "mail.example.test", 10),
    *(("manymx.example.test", f"mx{n}.example.test", n) for n in range(11)),
]


@pytest.fixture
def dns(dnsmasq: StartDnsmasq) -> Dnsmasq:
    return dnsmasq(zones=["example.test"], txt=RECORDS, a=A, mx=MX)


def policy(**kw: Any) -> config.Spf:
    return config.Spf.model_validate(kw)


def run(
    checker: SpfChecker,
    sender: str,
    *,
    ip: str = GOOD,
    helo: str = "[192.0.2.5]",
    pol: config.Spf | None = None,
) -> tuple[Verdict, AuthResults]:
    auth = AuthResults()
    v = asyncio.run(
        spf_layer.check(checker, pol or policy(), auth, client_ip=ip, helo=helo, mail_from=sender)
    )
    return v, auth


@pytest.mark.parametrize(
    ("sender", "ip", "result", "action", "reply", "why"),
    [
        ("a@pass.example.test", GOOD, "pass", Action.ACCEPT, None, "matched ip4:192.0.2.0/24"),
        (
            "a@fail.example.test",
            GOOD,
            "fail",
            Action.REJECT,
            "550 5.7.23 SPF fail: fail.example.test does not authorize this server to send its mail",
            "matched -all",
        ),
        ("a@soft.example.test", GOOD, "softfail", Action.QUARANTINE, None, "matched ~all"),
        ("a@neutral.example.test", GOOD, "neutral", Action.ACCEPT, None, "matched ?all"),
        ("a@none.example.test", GOOD, "none", Action.ACCEPT, None, ""),
        ("a@nothing.example.test", GOOD, "none", Action.ACCEPT, None, ""),
        ("a@syntax.example.test", GOOD, "permerror", Action.QUARANTINE, None, "Invalid IP4"),
        ("a@unknown.example.test", GOOD, "permerror", Action.QUARANTINE, None, "frobnicate"),
        ("a@inc.example.test", GOOD, "pass", Action.ACCEPT, None, "include:pass.example.test"),
        ("a@inc.example.test", OTHER, "fail", Action.REJECT, "550 5.7.23 ", "matched -all"),
        ("a@redir.example.test", GOOD, "pass", Action.ACCEPT, None, "matched ip4:192.0.2.0/24"),
        ("a@redir.example.test", OTHER, "fail", Action.REJECT, "550 5.7.23 ", "matched -all"),
        ("a@mx.example.test", GOOD, "pass", Action.ACCEPT, None, "matched mx"),
        # §4.6.4 limits: at the limit the record is evaluated, past it permerror.
        ("a@ten.example.test", GOOD, "fail", Action.REJECT, "550 5.7.23 ", "matched -all"),
        ("a@eleven.example.test", GOOD, "permerror", Action.QUARANTINE, None, "Too many DNS"),
        ("a@twovoid.example.test", GOOD, "fail", Action.REJECT, "550 5.7.23 ", "matched -all"),
        ("a@threevoid.example.test", GOOD, "permerror", Action.QUARANTINE, None, "Void lookup"),
        ("a@manymx.example.test", GOOD, "permerror", Action.QUARANTINE, None, "More than 10 MX"),
    ],
)
def test_each_result_with_the_default_actions(
    dns: Dnsmasq,
    sender: str,
    ip: str,
    result: str,
    action: Action,
    reply: str | None,
    why: str,
) -> None:
    checker = SpfChecker([dns.address], timeout=2.0)
    v, auth = run(checker, sender, ip=ip)
    assert (v.layer, v.reason, v.action, v.shadow) == (
        Layer.SPOOFING,
        f"spf.{result}",
        action,
        False,
    )
    if reply is None:
        assert v.reply is None
    else:
        assert str(v.reply).startswith(reply), v.reply
    domain = sender.rpartition("@")[2]
    mf = auth.spf_mailfrom
    assert mf is not None
    assert (mf.identity, mf.domain, mf.result, mf.client_ip) == ("mailfrom", domain, result, ip)
    assert why in mf.detail and why in v.detail
    assert f"SPF {result} for MAIL FROM {domain} from {ip}" in v.detail
    assert auth.spf_helo is None, "an address literal is no HELO identity"
    assert all(name.endswith("example.test") for _, name, _ in dns.queries())


def test_the_network_of_a_pass_is_recorded(dns: Dnsmasq) -> None:
    _, auth = run(SpfChecker([dns.address], timeout=2.0), "a@inc.example.test")
    assert auth.spf_mailfrom == SpfResult(
        "mailfrom", "inc.example.test", "pass", GOOD, 24, False, "matched include:pass.example.test"
    )


def test_a_nameserver_that_never_answers_is_temperror_and_deferred(silent: SilentServer) -> None:
    checker = SpfChecker([silent.address], timeout=0.3)
    v, auth = run(checker, "a@pass.example.test", helo="helo.example.test")
    assert (v.reason, v.action) == ("spf.temperror", Action.DEFER)
    assert str(v.reply) == (
        "451 4.7.24 SPF temperror: could not look up pass.example.test's SPF policy; "
        "try again later"
    )
    assert auth.spf_mailfrom is not None and auth.spf_mailfrom.result == "temperror"
    assert "timeout" in auth.spf_mailfrom.detail
    assert auth.spf_helo is not None and auth.spf_helo.result == "temperror"
    assert silent.received() >= 2, "both identities asked the configured server"


def test_the_helo_identity_is_recorded_and_mail_from_decides(dns: Dnsmasq) -> None:
    checker = SpfChecker([dns.address], timeout=2.0)
    v, auth = run(checker, "a@fail.example.test", helo="HELO.example.test")
    assert v.reason == "spf.fail"
    assert auth.spf_helo == SpfResult(
        "helo", "helo.example.test", "pass", GOOD, 24, False, "matched ip4:192.0.2.0/24"
    )
    assert "HELO helo.example.test: pass" in v.detail
    # The other way round: a failing HELO does not stop a passing sender.
    v, auth = run(checker, "a@pass.example.test", helo="fail.example.test")
    assert (v.reason, v.action) == ("spf.pass", Action.ACCEPT)
    assert auth.spf_helo is not None and auth.spf_helo.result == "fail"


@pytest.mark.parametrize("helo", ["[192.0.2.5]", "192.0.2.5", "localhost", ""])
def test_a_helo_that_is_no_domain_name_is_not_checked(dns: Dnsmasq, helo: str) -> None:
    v, auth = run(SpfChecker([dns.address], timeout=2.0), "a@pass.example.test", helo=helo)
    assert v.reason == "spf.pass"
    assert auth.spf_helo is None


def test_the_null_sender_is_checked_as_postmaster_at_the_helo(dns: Dnsmasq) -> None:
    checker = SpfChecker([dns.address], timeout=2.0)
    v, auth = run(checker, "", helo="helo.example.test")
    assert (v.reason, v.action) == ("spf.pass", Action.ACCEPT)
    assert auth.spf_mailfrom is None
    assert auth.spf_helo is not None
    assert (auth.spf_helo.identity, auth.spf_helo.domain) == ("helo", "helo.example.test")
    assert "HELO (null sender) helo.example.test" in v.detail

    v, auth = run(checker, "", ip=OTHER, helo="helo.example.test")
    assert (v.reason, v.action) == ("spf.fail", Action.REJECT)
    assert str(v.reply) == (
        "550 5.7.23 SPF fail: helo.example.test does not authorize this server to send its mail"
    )

    v, auth = run(checker, "", helo="[192.0.2.5]")
    assert (v.reason, v.action) == ("spf.none", Action.ACCEPT)
    assert auth.spf_helo == SpfResult("helo", "", "none", GOOD, detail="HELO is not a domain name")


@pytest.mark.parametrize(
    ("sender", "setting", "action", "reply"),
    [
        ("a@pass.example.test", {"pass": "tag"}, Action.TAG, None),
        (
            "a@pass.example.test",
            {"pass": "reject"},
            Action.REJECT,
            "550 5.7.23 SPF pass, but mail through this server is not accepted here",
        ),
        ("a@fail.example.test", {"fail": "quarantine"}, Action.QUARANTINE, None),
        (
            "a@fail.example.test",
            {"fail": "defer"},
            Action.DEFER,
            "451 4.7.23 SPF fail: fail.example.test does not authorize this server to send "
            "its mail; try again later",
        ),
        (
            "a@soft.example.test",
            {"softfail": "reject"},
            Action.REJECT,
            "550 5.7.23 SPF softfail: soft.example.test does not authorize this server to "
            "send its mail",
        ),
        ("a@neutral.example.test", {"neutral": "tag"}, Action.TAG, None),
        ("a@none.example.test", {"none": "quarantine"}, Action.QUARANTINE, None),
        (
            "a@syntax.example.test",
            {"permerror": "reject"},
            Action.REJECT,
            "550 5.7.24 SPF permerror: syntax.example.test's SPF policy is broken",
        ),
        ("a@syntax.example.test", {"permerror": "accept"}, Action.ACCEPT, None),
    ],
)
def test_each_result_takes_its_own_action(
    dns: Dnsmasq, sender: str, setting: dict[str, str], action: Action, reply: str | None
) -> None:
    v, _ = run(SpfChecker([dns.address], timeout=2.0), sender, pol=policy(**setting))
    assert v.action is action
    assert (str(v.reply) if v.reply else None) == reply


def test_a_temperror_takes_its_action_too(silent: SilentServer) -> None:
    checker = SpfChecker([silent.address], timeout=0.2)
    v, _ = run(checker, "a@pass.example.test", helo="", pol=policy(temperror="accept"))
    assert (v.reason, v.action, v.reply) == ("spf.temperror", Action.ACCEPT, None)


def test_shadow_mode_records_but_does_not_act(dns: Dnsmasq) -> None:
    checker = SpfChecker([dns.address], timeout=2.0)
    v, auth = run(checker, "a@fail.example.test", pol=policy(mode="shadow"))
    assert (v.reason, v.action, v.shadow, v.acts) == ("spf.fail", Action.REJECT, True, False)
    assert auth.spf_mailfrom is not None and auth.spf_mailfrom.result == "fail"
    v, _ = run(checker, "a@pass.example.test", pol=policy(mode="shadow"))
    assert (v.action, v.shadow) == (Action.ACCEPT, False), "an accept is not a shadow decision"


@pytest.mark.parametrize(
    ("sender", "helo"),
    [
        ("a@fail.example.test", "evil\r\n550 5.0.0 injected"),
        ("a@fail.example.test", 'x"y\\z\x00.example.test'),
        ('a@fail"\r\nX: y.example.test', "helo.example.test"),
        ("a@f\u00e4il.example.test\x1b[31m", "h\u00e9lo.example.test"),
    ],
)
def test_client_strings_never_reach_a_reply_or_a_log_line_unescaped(
    dns: Dnsmasq, sender: str, helo: str
) -> None:
    v, auth = run(SpfChecker([dns.address], timeout=2.0), sender, ip=OTHER, helo=helo)
    texts = [v.detail, str(v.reply or "")]
    texts += [r.detail for r in (auth.spf_mailfrom, auth.spf_helo) if r is not None]
    for text in texts:
        assert text.isascii() and text.isprintable(), repr(text)
        assert "injected" not in str(v.reply or "")
    if v.reply is not None:
        assert '"' not in v.reply.text and "\\" not in v.reply.text


def test_the_pipeline_shape_calls_the_same_check(dns: Dnsmasq) -> None:
    layer = spf_layer.for_pipeline(SpfChecker([dns.address], timeout=2.0))
    auth = AuthResults()
    v = asyncio.run(layer(policy(), auth, OTHER, "helo.example.test", "a@pass.example.test"))
    assert (v.reason, v.action) == ("spf.fail", Action.REJECT)
    assert auth.spf_mailfrom is not None and auth.spf_helo is not None


def test_both_identities_reach_the_authentication_results_header(dns: Dnsmasq) -> None:
    checker = SpfChecker([dns.address], timeout=2.0)
    _, auth = run(checker, "a@fail.example.test", ip=OTHER, helo="helo.example.test")
    assert auth.header("mx.kithmail.test") == (
        "mx.kithmail.test;"
        '\r\n\tspf=fail reason="matched -all" smtp.mailfrom=fail.example.test;'
        '\r\n\tspf=fail reason="matched -all" smtp.helo=helo.example.test'
    )
    _, auth = run(checker, "", helo="helo.example.test")
    assert auth.header("mx.kithmail.test") == (
        'mx.kithmail.test;\r\n\tspf=pass reason="matched ip4:192.0.2.0/24" '
        "smtp.helo=helo.example.test"
    )
    assert auth.summary() == "spf=pass dkim=none"
