"""Policy overrides in the database: global and per tenant, validated as the file is.

What an admin checks: an override set for one tenant changes how the next
message to that tenant's domain is treated, and not another tenant's (an
SPF softfail, served by a real dnsmasq, refused at RCPT instead of held);
a bad value is refused with the message the config file would get; a
tenant cannot touch a gateway-wide key; the page that shows each value
says where it comes from (built-in, file, global, tenant) and what it
replaces; every change is in the audit log. The server is a real
`kith serve`, the database a real SQLite file that both share.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from auth_zones import message
from dns_server import Dnsmasq, StartDnsmasq
from gateway import Client, Gateway, make_gateway, run, send

from kithmail import config
from kithmail.db import Database
from kithmail.overrides import OverrideError, Overrides, file_keys_of, keys
from kithmail.tenants import Policies, TenantPolicy

OUTSIDE = "127.0.0.70"
SOFT = ("soft.test", "v=spf1 ip4:192.0.2.0/24 ~all")  # 127.0.0.70 is not in it: softfail
DNSBL = "bl.test"


# --------------------------------------------------------------- without a server


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    d = Database.open(tmp_path / "kithmail.db")
    d.sync_domains(["example.test", "acme.test"])
    d.add_tenant("acme")
    d.set_domain_tenant("acme.test", "acme")
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def file_settings(tmp_path: Path) -> config.Settings:
    path = tmp_path / "kithmail.toml"
    path.write_text(
        '[domains]\nlocal = ["example.test", "acme.test"]\n\n'
        '[spf]\nsoftfail = "tag"\n\n[recon]\nmin_delay = "2m"\n'
    )
    return config.load(path)


def _file_error(tmp_path: Path, section: str, key: str, toml_value: str) -> str:
    """What `kith check-config` says about the same value written in the file."""
    bad = tmp_path / "bad.toml"
    bad.write_text(f"[{section}]\n{key} = {toml_value}\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(bad)
    return str(e.value).split(": ", 1)[1]


def test_a_bad_value_is_refused_with_the_message_the_file_would_get(
    tmp_path: Path, db: Database, file_settings: config.Settings
) -> None:
    ov = Overrides(db, lambda: file_settings)
    with pytest.raises(OverrideError) as e:
        ov.set("", "spf.softfail", "bounce", actor="admin@example.test")
    assert "`spf.softfail`" in str(e.value)
    assert str(e.value).endswith(_file_error(tmp_path, "spf", "softfail", '"bounce"'))
    with pytest.raises(OverrideError) as e:
        ov.set("acme", "community.challenge_interval", "soon", actor="admin@acme.test")
    assert str(e.value).endswith(_file_error(tmp_path, "community", "challenge_interval", '"soon"'))
    # A value that is valid alone but not beside the rest in force.
    with pytest.raises(OverrideError, match="min_delay is longer than retry_window"):
        ov.set("", "recon.min_delay", "2d", actor="admin@example.test")
    with pytest.raises(OverrideError, match="list of strings"):
        ov.set("", "reputation.dnsbl", {"zone": "x"}, actor="admin@example.test")
    assert ov.get("") == {} and ov.get("acme") == {}
    assert ov.effective("acme") is file_settings


def test_a_tenant_cannot_set_a_global_key_nor_anyone_a_file_only_key(
    db: Database, file_settings: config.Settings
) -> None:
    ov = Overrides(db, lambda: file_settings)
    with pytest.raises(OverrideError) as e:
        ov.set("acme", "recon.min_delay", "5s", actor="admin@acme.test")
    assert str(e.value) == (
        "`recon.min_delay` is the same for every tenant: only a global admin may override it"
    )
    with pytest.raises(OverrideError, match=r"`server\.hostname` cannot be overridden here"):
        ov.set("", "server.hostname", "mx.evil.test", actor="admin@example.test")
    with pytest.raises(
        OverrideError, match=r"unknown key `spf.sofail` \(did you mean `spf.softfail`"
    ):
        ov.set("", "spf.sofail", "tag", actor="admin@example.test")
    with pytest.raises(OverrideError, match="no tenant named 'nobody'"):
        ov.set("nobody", "spf.softfail", "tag", actor="admin@example.test")
    assert {k.key for k in keys("tenant_admin")} < {k.key for k in keys("global_admin")}
    assert "recon.min_delay" not in {k.key for k in keys("tenant_admin")}
    assert "server.hostname" not in {k.key for k in keys("global_admin")}
    assert ov.get("acme") == {}
    # The global admin may set it; the tenant's settings follow.
    ov.set("", "recon.min_delay", "5s", actor="admin@example.test")
    assert ov.effective("acme").recon.min_delay == 5.0


def test_explain_names_each_origin_and_what_it_replaces(
    db: Database, file_settings: config.Settings
) -> None:
    ov = Overrides(db, lambda: file_settings)
    assert file_keys_of(file_settings) == {"domains.local", "spf.softfail", "recon.min_delay"}
    ov.set("", "spf.softfail", "defer", actor="admin@example.test")
    ov.set("acme", "spf.softfail", "reject", actor="admin@acme.test")
    ov.set("acme", "spf.neutral", "quarantine", actor="admin@acme.test")
    ov.set("", "spf.fail", "defer", actor="admin@example.test")
    ov.set("", "community.challenge_interval", 7200, actor="admin@example.test")

    acme = {s.key: s for s in ov.explain("acme")}
    assert [s.key for s in ov.explain("acme")] == [k.key for k in keys("tenant_admin")]
    s = acme["spf.softfail"]
    assert (s.value, s.origin, s.replaces, s.replaces_origin) == (
        "reject",
        "tenant",
        "defer",
        "global",
    )
    s = acme["spf.neutral"]
    assert (s.value, s.origin, s.replaces, s.replaces_origin) == (
        "quarantine",
        "tenant",
        "accept",
        "built-in",
    )
    s = acme["spf.fail"]
    assert (s.value, s.origin, s.replaces, s.replaces_origin) == (
        "defer",
        "global",
        "reject",
        "built-in",
    )
    s = acme["spf.pass"]
    assert (s.value, s.origin, s.replaces, s.replaces_origin) == (
        "accept",
        "built-in",
        "accept",
        None,
    )
    s = acme["community.challenge_interval"]  # stored in the file's notation
    assert (s.value, s.origin) == ("2h", "global")

    glob = {s.key: s for s in ov.explain(None)}
    s = glob["spf.softfail"]
    assert (s.value, s.origin, s.replaces, s.replaces_origin) == ("defer", "global", "tag", "file")
    s = glob["recon.min_delay"]
    assert (s.value, s.origin, s.replaces, s.replaces_origin) == ("2m", "file", "1m", "built-in")

    assert ov.effective("acme").spf.softfail == "reject"
    assert ov.effective("default").spf.softfail == "defer"
    assert ov.effective(None).spf.softfail == "defer"
    ov.unset("acme", "spf.softfail", actor="admin@acme.test")
    s = {s.key: s for s in ov.explain("acme")}["spf.softfail"]
    assert (s.value, s.origin, s.replaces, s.replaces_origin) == ("defer", "global", "tag", "file")


def test_a_tenant_cannot_remove_a_global_override(
    db: Database, file_settings: config.Settings
) -> None:
    ov = Overrides(db, lambda: file_settings)
    ov.set("", "recon.min_delay", "5m", actor="admin@example.test")
    with pytest.raises(OverrideError, match="only a global admin"):
        ov.unset("acme", "recon.min_delay", actor="admin@acme.test")
    assert ov.get("") == {"recon.min_delay": "5m"}


def test_policies_give_each_tenants_domain_its_settings(
    db: Database, file_settings: config.Settings
) -> None:
    ov = Overrides(db, lambda: policies.settings)
    policies = Policies(file_settings, db.tenant_of, ov)
    assert policies.for_domain("acme.test") == TenantPolicy("acme", file_settings)
    ov.set("acme", "spf.softfail", "reject", actor="admin@acme.test")
    acme = policies.for_domain("acme.test")
    plain = policies.for_domain("example.test")
    assert acme is not None and plain is not None
    assert (acme.tenant, acme.settings.spf.softfail) == ("acme", "reject")
    assert (plain.tenant, plain.settings.spf.softfail) == ("default", "tag")
    assert policies.for_domain("elsewhere.test") is None
    # A reload's new file: the tenant's override stays over it.
    policies.update(
        config.from_mapping(
            {"domains": {"local": ["example.test", "acme.test"]}, "spf": {"neutral": "tag"}},
            "new.toml",
        )
    )
    acme = policies.for_domain("acme.test")
    assert acme is not None
    assert (acme.settings.spf.softfail, acme.settings.spf.neutral) == ("reject", "tag")


def test_every_change_is_in_the_audit_log(db: Database, file_settings: config.Settings) -> None:
    ov = Overrides(db, lambda: file_settings)
    ov.set("acme", "community.sav", False, actor="admin@acme.test")
    ov.unset("acme", "community.sav", actor="admin@acme.test")
    ov.unset("acme", "community.sav", actor="admin@acme.test")  # nothing left: not logged
    rows = db.read("SELECT actor, tenant, action, target, detail FROM audit_log ORDER BY id")
    assert rows == [
        ("admin@acme.test", "acme", "policy.set", "community.sav", "false"),
        ("admin@acme.test", "acme", "policy.unset", "community.sav", ""),
    ]


def test_an_override_the_file_no_longer_allows_is_skipped_not_fatal(
    tmp_path: Path, db: Database
) -> None:
    current = [config.from_mapping({}, "a.toml")]
    ov = Overrides(db, lambda: current[0])
    ov.set("", "recon.min_delay", "20h", actor="admin@example.test")
    ov.set("", "spf.softfail", "reject", actor="admin@example.test")
    assert ov.effective(None).recon.min_delay == 72000.0
    # The file now says retry_window = 1h: 20h of min_delay cannot stand.
    current[0] = config.from_mapping({"recon": {"retry_window": "1h"}}, "b.toml")
    s = ov.effective(None)
    assert s.recon.min_delay == 60.0 and s.recon.retry_window == 3600.0
    assert s.spf.softfail == "reject"
    by_key = {x.key: x for x in ov.explain(None)}
    assert by_key["recon.min_delay"].origin == "built-in"
    assert by_key["spf.softfail"].origin == "global"


# --------------------------------------------------------------- in a running gateway


@pytest.fixture
def zones(dnsmasq: StartDnsmasq) -> Dnsmasq:
    # bl.test is a DNSBL that lists OUTSIDE.
    return dnsmasq(zones=("soft.test", DNSBL), txt=[SOFT], a=[(f"70.0.0.127.{DNSBL}", "127.0.0.2")])


@pytest.fixture
def two_tenants(tmp_path: Path, zones: Dnsmasq) -> Iterator[Gateway]:
    """example.test is the default tenant's, other.test tenant acme's."""
    gw = make_gateway(
        tmp_path / "gw",
        users=("ann@example.test",),
        sections={
            "dns": {"nameservers": [zones.address], "timeout": "1s"},
            "recon": {"exempt_networks": ["127.0.0.0/24"]},
        },
    )
    with Database.open(gw.data_dir / "kithmail.db") as d:
        d.add_tenant("acme")
        d.set_domain_tenant("other.test", "acme")
        d.add_user("carol@other.test", password="correct horse battery staple")
    gw.start()
    try:
        yield gw
    finally:
        try:
            gw.stop()
        finally:
            gw.kill()


async def _rcpt(gw: Gateway, sender: str, rcpt: str) -> str:
    """The reply to RCPT (no message is sent)."""
    c, _ = await Client.connect(gw.port, OUTSIDE)
    try:
        await c.cmd("EHLO client.example")
        await c.cmd(f"MAIL FROM:<{sender}>")
        return str(await c.cmd(f"RCPT TO:<{rcpt}>"))
    finally:
        await c.cmd("QUIT")
        await c.close()


def _states(gw: Gateway) -> dict[str, str]:
    listed = json.loads(gw.kith("queue", "list", "--json").stdout)
    return {r["address"]: r["state"] for m in listed for r in m["recipients"]}


def test_a_tenant_override_changes_that_tenants_mail_only(two_tenants: Gateway) -> None:
    gw = two_tenants
    with Database.open(gw.data_dir / "kithmail.db") as d:
        ov = Overrides(d, lambda: config.load(gw.config))
        ov.set("acme", "spf.softfail", "reject", actor="admin@other.test")
    # Every worker sees it within about a second.
    refused = gw.wait_for(
        "the override in force",
        lambda: (r := run(_rcpt(gw, "y@soft.test", "carol@other.test"))).startswith("550") and r,
    )
    assert "5.7.23 SPF softfail" in refused, refused
    replies = run(
        send(gw.port, OUTSIDE, "y@soft.test", ["carol@other.test"], message(from_="y@soft.test"))
    )
    assert (replies[-1].code, replies[-1].status) == (550, "5.7.23"), replies
    # The other tenant's mail still gets the file's treatment: held.
    replies = run(
        send(gw.port, OUTSIDE, "y@soft.test", ["ann@example.test"], message(from_="y@soft.test"))
    )
    assert replies[-1].code == 250, replies
    assert _states(gw) == {"ann@example.test": "held"}
    assert gw.messages("carol@other.test") == [] and gw.messages("ann@example.test") == []
    # Removed, the file's treatment is back for acme too.
    with Database.open(gw.data_dir / "kithmail.db") as d:
        Overrides(d, lambda: config.load(gw.config)).unset(
            "acme", "spf.softfail", actor="admin@other.test"
        )
    gw.wait_for(
        "the override gone",
        lambda: run(_rcpt(gw, "y@soft.test", "carol@other.test")).startswith("250"),
    )


async def _policy(port: int, client: str, recipient: str) -> str:
    """One Postfix policy request to the gateway's policy service; its action line."""
    attrs = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "client_address": client,
        "sender": "x@example.org",
        "recipient": recipient,
        "instance": f"{client}-{recipient}",
    }
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(("".join(f"{k}={v}\n" for k, v in attrs.items()) + "\n").encode())
        await w.drain()
        return (await r.readuntil(b"\n\n")).decode().strip()
    finally:
        w.close()
        await w.wait_closed()


def test_the_policy_service_follows_the_recipients_tenant(two_tenants: Gateway) -> None:
    gw = two_tenants
    with Database.open(gw.data_dir / "kithmail.db") as d:
        Overrides(d, lambda: config.load(gw.config)).set(
            "acme", "recon.enabled", False, actor="admin@other.test"
        )
    # A source Recon has never seen: acme has Recon off, the default tenant not.
    gw.wait_for(
        "the override in force",
        lambda: run(_policy(gw.policy_port, "198.51.100.7", "carol@other.test")) == "action=DUNNO",
    )
    deferred = run(_policy(gw.policy_port, "198.51.100.8", "ann@example.test"))
    assert deferred.startswith("action=DEFER_IF_PERMIT 4.7.1 Greylisted"), deferred


def test_a_tenants_dnsbl_refuses_only_its_mail_at_both_fronts(two_tenants: Gateway) -> None:
    gw = two_tenants
    with Database.open(gw.data_dir / "kithmail.db") as d:
        Overrides(d, lambda: config.load(gw.config)).set(
            "acme", "reputation.dnsbl", [DNSBL], actor="admin@other.test"
        )

    async def rcpt(rcpt: str) -> str:
        c, _ = await Client.connect(gw.port, OUTSIDE)
        try:
            await c.cmd("EHLO client.example")
            await c.cmd("MAIL FROM:<x@example.org>")
            return str(await c.cmd(f"RCPT TO:<{rcpt}>"))
        finally:
            await c.close()

    refused = gw.wait_for(
        "the override in force",
        lambda: (r := run(rcpt("carol@other.test"))).startswith("554") and r,
    )
    assert f"5.7.1 Service unavailable; client host [{OUTSIDE}] blocked using {DNSBL}" in refused
    assert run(rcpt("ann@example.test")).startswith("250")
    # The Postfix policy service asks the same DNSBL for acme's recipients only.
    answer = run(_policy(gw.policy_port, OUTSIDE, "carol@other.test"))
    assert answer.startswith("action=554 5.7.1") and DNSBL in answer, answer
    assert run(_policy(gw.policy_port, OUTSIDE, "ann@example.test")) == "action=DUNNO"
