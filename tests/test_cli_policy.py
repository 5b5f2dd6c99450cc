"""``kith policy show|set|unset`` and ``kith user role``, run for real.

Each test runs the installed ``kith`` script as a subprocess, as an
operator would, against a temporary data directory, and checks what it
prints, its exit status and what it left in kithmail.db (the audit log,
the stored overrides). The last test changes a tenant's SPF action with
``kith policy set`` while a real ``kith serve`` runs, and sends mail to
see the server apply it without a reload.
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway import Gateway, make_gateway, run, send
from kith_cli import Kith, Run, databases, run_kith

from kithmail.cli_policy import parse_value
from kithmail.db import Database

ACTOR = f"cli:{pwd.getpwuid(os.getuid()).pw_name}"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "var"


@pytest.fixture
def kith(tmp_path: Path, data_dir: Path) -> Kith:
    """Run ``kith ARGS... -c CONFIG``: two local domains, ``[spf] softfail`` set in the file."""
    config = tmp_path / "kithmail.toml"
    config.write_text(
        f'[server]\ndata_dir = "{data_dir}"\n\n[domains]\nlocal = ["example.test", "other.test"]\n'
        '\n[spf]\nsoftfail = "tag"\n'
    )

    def run_(*args: str) -> Run:
        return run_kith([*args, "-c", str(config)], cwd=tmp_path)

    assert run_("tenant", "add", "acme").code == 0
    assert run_("tenant", "domain", "acme", "other.test").code == 0
    return run_


@pytest.fixture
def database(data_dir: Path) -> Iterator[Callable[[], Database]]:
    with databases(data_dir) as open_:
        yield open_


def rows(out: str) -> dict[str, list[str]]:
    """The table of ``kith policy show``: key -> [value, origin, replaces]."""
    lines = out.splitlines()
    assert lines[0].split() == ["key", "value", "origin", "replaces"], out
    found = {}
    for line in lines[1:]:
        key, rest = line.split(None, 1)
        found[key] = [c.strip() for c in rest.split("  ") if c.strip()]
    return found


def audit(d: Database) -> list[tuple[Any, ...]]:
    return d.read("SELECT actor, tenant, action, target, detail FROM audit_log ORDER BY id")


def stored(d: Database) -> list[tuple[Any, ...]]:
    return d.read("SELECT scope, key, value FROM overrides ORDER BY scope, key")


# --- show ------------------------------------------------------------------------------------


def test_show_names_each_values_origin_and_what_it_replaces(kith: Kith) -> None:
    r = kith("policy", "show")
    assert r.code == 0, r.err
    table = rows(r.out)
    assert table["spf.softfail"] == ["tag", "file", "quarantine (built-in)"]
    assert table["spf.fail"] == ["reject", "built-in", "-"]
    # Global: every key, the shared Recon timings too.
    assert table["recon.min_delay"] == ["1m", "built-in", "-"]
    doc = json.loads(kith("policy", "show", "--json").out)
    softfail = next(d for d in doc if d["key"] == "spf.softfail")
    assert softfail == {
        "key": "spf.softfail",
        "value": "tag",
        "origin": "file",
        "replaces": "quarantine",
        "replaces_origin": "built-in",
        "ignored_override": None,
    }


def test_a_tenants_show_lists_only_what_a_tenant_may_change(kith: Kith) -> None:
    r = kith("policy", "show", "--tenant", "ACME")
    assert r.code == 0, r.err
    table = rows(r.out)
    assert table["spf.softfail"] == ["tag", "file", "quarantine (built-in)"]
    assert "recon.min_delay" not in table  # the Recon table is shared by every tenant


def test_show_flags_a_stored_override_that_no_longer_validates(
    kith: Kith, database: Callable[[], Database]
) -> None:
    # As if a newer file or an older kithmail made it invalid: the server skips it.
    with database().write() as conn:
        conn.execute(
            "INSERT INTO overrides (scope, key, value, changed_at, changed_by)"
            " VALUES ('', 'spf.softfail', '\"bounce\"', 0, 'test')"
        )
    r = kith("policy", "show")
    assert r.code == 0, r.err
    assert rows(r.out)["spf.softfail"] == ["tag", "file", "quarantine (built-in)"]
    assert r.err == (
        "note: the global override spf.softfail = bounce is ignored: global override: "
        "`spf.softfail`: Input should be 'accept', 'tag', 'quarantine', 'defer' or 'reject'\n"
    )
    doc = json.loads(kith("policy", "show", "--json").out)
    assert next(d for d in doc if d["key"] == "spf.softfail")["ignored_override"] == "bounce"
    # And it can be removed.
    assert kith("policy", "unset", "spf.softfail").code == 0
    assert stored(database()) == []


def test_show_of_an_unknown_tenant_is_not_found(kith: Kith) -> None:
    r = kith("policy", "show", "--tenant", "nobody")
    assert (r.code, r.out, r.err) == (1, "", "kith: error: no tenant named 'nobody'\n")


# --- set and unset ---------------------------------------------------------------------------


def test_set_globally_then_for_a_tenant_layers_as_documented(
    kith: Kith, database: Callable[[], Database]
) -> None:
    r = kith("policy", "set", "spf.softfail", "reject")
    assert (r.code, r.out) == (0, "spf.softfail = reject for global (was tag, from file)\n"), r.err
    r = kith("policy", "set", "spf.softfail", "quarantine", "--tenant", "acme")
    assert r.out == "spf.softfail = quarantine for tenant acme (was reject, from global)\n"

    assert rows(kith("policy", "show").out)["spf.softfail"] == ["reject", "global", "tag (file)"]
    assert rows(kith("policy", "show", "--tenant", "acme").out)["spf.softfail"] == [
        "quarantine",
        "tenant",
        "reject (global)",
    ]
    d = database()
    assert stored(d) == [("", "spf.softfail", '"reject"'), ("acme", "spf.softfail", '"quarantine"')]
    assert audit(d)[-2:] == [
        (ACTOR, "", "policy.set", "spf.softfail", '"reject"'),
        (ACTOR, "acme", "policy.set", "spf.softfail", '"quarantine"'),
    ]


def test_values_are_toml_when_they_parse_and_bare_words_otherwise(
    kith: Kith, database: Callable[[], Database]
) -> None:
    assert (
        kith("policy", "set", "recon.exempt_networks", '["10.0.0.0/8", "192.0.2.0/24"]').code == 0
    )
    assert kith("policy", "set", "recon.enabled", "false").code == 0
    assert kith("policy", "set", "recon.min_delay", "90s").code == 0
    assert kith("policy", "set", "community.quarantine_days", "7", "--tenant", "acme").code == 0
    assert kith("policy", "set", "spf.neutral", '"tag"').code == 0
    assert stored(database()) == [
        ("", "recon.enabled", "false"),
        ("", "recon.exempt_networks", '["10.0.0.0/8","192.0.2.0/24"]'),
        ("", "recon.min_delay", '"90s"'),
        ("", "spf.neutral", '"tag"'),
        ("acme", "community.quarantine_days", "7"),
    ]
    table = rows(kith("policy", "show").out)
    assert table["recon.exempt_networks"][:2] == ["10.0.0.0/8, 192.0.2.0/24", "global"]
    assert table["recon.min_delay"][:2] == ["90s", "global"]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("reject", "reject"),
        ('"reject"', "reject"),
        ("60s", "60s"),
        ("true", True),
        ("3", 3),
        ('["a", "b"]', ["a", "b"]),
        ("[]", []),
        ("1979-05-27", "1979-05-27"),  # a TOML date is no config value: the text
        ("{a = 1}", "{a = 1}"),
        ("1\nb = 2", "1\nb = 2"),
    ],
)
def test_parse_value(text: str, value: object) -> None:
    assert parse_value(text) == value


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("spf.softfail", "bounce"),
            "kith: error: global override: `spf.softfail`: Input should be 'accept', 'tag', "
            "'quarantine', 'defer' or 'reject'\n",
        ),
        (
            ("spf.sofftfail", "reject"),
            "kith: error: unknown key `spf.sofftfail` (did you mean `spf.softfail`?)\n",
        ),
        (
            ("server.hostname", "mx.evil.test"),
            "kith: error: `server.hostname` cannot be overridden here: it is set in the "
            "config file\n",
        ),
        (
            ("recon.min_delay", "5s", "--tenant", "acme"),
            "kith: error: `recon.min_delay` is the same for every tenant: only a global admin "
            "may override it\n",
        ),
    ],
)
def test_a_refused_value_is_one_line_exit_2_and_stores_nothing(
    kith: Kith, database: Callable[[], Database], args: tuple[str, ...], message: str
) -> None:
    r = kith("policy", "set", *args)
    assert (r.code, r.out, r.err) == (2, "", message)
    d = database()
    assert stored(d) == []
    assert not [a for a in audit(d) if a[2].startswith("policy.")]


def test_set_for_an_unknown_tenant_is_not_found(kith: Kith) -> None:
    r = kith("policy", "set", "spf.softfail", "reject", "--tenant", "nobody")
    assert (r.code, r.err) == (1, "kith: error: no tenant named 'nobody'\n")


def test_unset_restores_the_weaker_value_and_says_what_is_in_force(
    kith: Kith, database: Callable[[], Database]
) -> None:
    assert kith("policy", "set", "spf.softfail", "reject").code == 0
    assert kith("policy", "set", "spf.softfail", "defer", "--tenant", "acme").code == 0
    r = kith("policy", "unset", "spf.softfail", "--tenant", "acme")
    assert (r.code, r.out) == (
        0,
        "removed the tenant acme override of spf.softfail; in force now: reject (global)\n",
    ), r.err
    r = kith("policy", "unset", "spf.softfail")
    assert r.out == "removed the global override of spf.softfail; in force now: tag (file)\n"
    d = database()
    assert stored(d) == []
    assert audit(d)[-2:] == [
        (ACTOR, "acme", "policy.unset", "spf.softfail", ""),
        (ACTOR, "", "policy.unset", "spf.softfail", ""),
    ]
    r = kith("policy", "unset", "spf.softfail")
    assert (r.code, r.err) == (
        1,
        "kith: error: no global override of spf.softfail; nothing changed\n",
    )
    r = kith("policy", "unset", "spf.nonsense")
    assert (r.code, r.err) == (2, "kith: error: unknown key `spf.nonsense`\n")


def test_bare_kith_policy_is_still_the_policy_service(kith: Kith) -> None:
    r = kith("policy", "--help")
    assert r.code == 0
    assert "policy-delegation protocol" in r.out
    assert "show" in r.out and "unset" in r.out
    r = kith("policy", "shwo")
    assert r.code == 2 and "invalid choice: 'shwo'" in r.err


# --- kith user role --------------------------------------------------------------------------


def test_user_role_promotes_demotes_and_is_audited(
    kith: Kith, database: Callable[[], Database]
) -> None:
    assert kith("user", "add", "olga@other.test").code == 0
    r = kith("user", "role", "Olga@Other.TEST", "tenant_admin")
    assert (r.code, r.out) == (0, "olga@other.test is now tenant_admin (was user)\n"), r.err
    r = kith("user", "role", "olga@other.test", "tenant_admin")
    assert (r.code, r.out) == (0, "olga@other.test was already tenant_admin\n")
    d = database()
    assert d.user("olga@other.test").role == "tenant_admin"
    assert [a for a in audit(d) if a[2] == "user.role"] == [
        (ACTOR, "acme", "user.role", "olga@other.test", "user -> tenant_admin")
    ]


def test_the_last_global_admin_keeps_the_role(kith: Kith, database: Callable[[], Database]) -> None:
    assert kith("user", "add", "root@example.test", "--role", "global_admin").code == 0
    r = kith("user", "role", "root@example.test", "user")
    assert (r.code, r.out) == (1, "")
    assert r.err == "kith: error: root@example.test is the last enabled global admin\n"
    assert database().user("root@example.test").role == "global_admin"
    # With a second one, the first may step down.
    assert kith("user", "add", "ops@example.test", "--role", "global_admin").code == 0
    assert kith("user", "role", "root@example.test", "user").code == 0


def test_user_role_refuses_unknown_roles_and_users(kith: Kith) -> None:
    r = kith("user", "role", "ann@example.test", "superuser")
    assert r.code == 2 and "invalid choice: 'superuser'" in r.err
    r = kith("user", "role", "nobody@example.test", "user")
    assert (r.code, r.err) == (1, "kith: error: no user nobody@example.test\n")


# --- against a running gateway ---------------------------------------------------------------


def test_a_tenants_override_changes_the_next_message_without_a_reload(tmp_path: Path) -> None:
    # No DNS answers here: every SPF check is a temperror, which the file
    # accepts. Acme (other.test) is made to reject it, from the shell.
    gw: Gateway = make_gateway(
        tmp_path / "gw",
        users=("ann@example.test", "olga@other.test"),
        sections={"recon": {"exempt_networks": ["127.0.0.0/24"]}},
    )
    gw.kith("tenant", "add", "acme")
    gw.kith("tenant", "domain", "acme", "other.test")
    gw.start()
    try:

        def rcpt(address: str) -> int:
            replies = run(send(gw.port, "127.0.0.2", "x@remote.test", [address]))
            return int(replies[2].code)

        assert rcpt("olga@other.test") == 250
        done = gw.kith("policy", "set", "spf.temperror", "reject", "--tenant", "acme")
        assert "for tenant acme" in done.stdout
        gw.wait_for("acme's mail refused", lambda: rcpt("olga@other.test") == 550)
        assert rcpt("ann@example.test") == 250  # the default tenant keeps the file's action
        assert '"reason":"spf.temperror"' in gw.log_text()
        gw.kith("policy", "unset", "spf.temperror", "--tenant", "acme")
        gw.wait_for("acme's mail accepted again", lambda: rcpt("olga@other.test") == 250)
    finally:
        try:
            gw.stop()
        finally:
            gw.kill()
