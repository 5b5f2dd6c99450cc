"""``kith user …`` and ``kith tenant …``, run for real against a temporary data directory.

Each test runs the installed ``kith`` script as a subprocess, as an
operator would, and checks what it prints, its exit status and what it
left in kithmail.db (read back through `kithmail.db.Database` here).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kith_cli import Kith, Run, databases, run_kith

from kithmail.db import Database


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "var"


@pytest.fixture
def config_file(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "kithmail.toml"
    path.write_text(
        f'[server]\ndata_dir = "{data_dir}"\n\n[domains]\nlocal = ["example.test", "Other.TEST"]\n'
    )
    return path


@pytest.fixture
def kith(tmp_path: Path, config_file: Path) -> Kith:
    """Run ``kith ARGS... -c CONFIG`` in tmp_path."""

    def run(*args: str, stdin: str | None = None, config: Path | None = config_file) -> Run:
        tail = ["-c", str(config)] if config is not None else []
        return run_kith([*args, *tail], cwd=tmp_path, stdin=stdin)

    return run


@pytest.fixture
def database(data_dir: Path) -> Iterator[Callable[[], Database]]:
    with databases(data_dir) as open_:
        yield open_


def password_of(out: str) -> str:
    m = re.search(r"^password: (\S+)$", out, re.MULTILINE)
    assert m, out
    return m.group(1)


# --- kith user -------------------------------------------------------------------------------


def test_user_add_prints_a_password_once_that_verifies(
    kith: Kith, database: Callable[[], Database], data_dir: Path
) -> None:
    r = kith("user", "add", "Ann@Example.TEST")
    assert r.code == 0, r.err
    assert r.out.splitlines()[0] == "added user ann@example.test (tenant default, role user)"
    password = password_of(r.out)
    assert "shown only this once" in r.err
    d = database()
    user = d.verify_password("ann@example.test", password)
    assert user is not None and (user.tenant, user.role) == ("default", "user")
    assert (data_dir / "kithmail.db").stat().st_mode & 0o777 == 0o600


def test_user_add_with_password_from_stdin(kith: Kith, database: Callable[[], Database]) -> None:
    r = kith(
        "user",
        "add",
        "boss@other.test",
        "--role",
        "tenant_admin",
        "--password-stdin",
        stdin="correct horse battery\nignored second line\n",
    )
    assert r.code == 0, r.err
    assert r.out == "added user boss@other.test (tenant default, role tenant_admin)\n"
    user = database().verify_password("boss@other.test", "correct horse battery")
    assert user is not None and user.role == "tenant_admin"


def test_user_add_refuses_duplicates_folded(kith: Kith) -> None:
    assert kith("user", "add", "ann@example.test").code == 0
    r = kith("user", "add", "ANN@EXAMPLE.TEST")
    assert (r.code, r.out) == (1, "")
    assert r.err == "kith: error: user ann@example.test exists already\n"


@pytest.mark.parametrize(
    "address",
    [
        '"ann"@example.test',
        "ann%elsewhere.test@example.test",
        "elsewhere.test!ann@example.test",
        "ann@elsewhere.test@example.test",
        "@relay.test:ann@example.test",
        "ann@[192.0.2.1]",
        "ann@example.test.",
        "a" * 65 + "@example.test",
    ],
)
def test_user_add_refuses_relay_tricks_as_usage_errors(
    kith: Kith, data_dir: Path, address: str
) -> None:
    r = kith("user", "add", address)
    assert r.code == 2
    assert r.err.startswith("kith user add: error: argument ADDRESS: invalid address")
    assert len(r.err.splitlines()) == 1
    assert not (data_dir / "kithmail.db").exists()  # refused before anything was opened


def test_user_add_names_the_key_for_a_foreign_domain(kith: Kith) -> None:
    r = kith("user", "add", "ann@elsewhere.test")
    assert r.code == 1
    assert r.err == (
        "kith: error: ann@elsewhere.test: elsewhere.test is not a local domain "
        "(add it to [domains] local)\n"
    )


def test_user_add_bad_role_and_empty_stdin(kith: Kith) -> None:
    r = kith("user", "add", "ann@example.test", "--role", "root")
    assert r.code == 2 and "invalid choice: 'root'" in r.err
    r = kith("user", "add", "ann@example.test", "--password-stdin", stdin="")
    assert (r.code, r.err) == (1, "kith: error: --password-stdin: no password on stdin\n")
    r = kith("user", "add", "ann@example.test", "--password-stdin", stdin="short\n")
    assert r.code == 1 and "8 to 1024 characters" in r.err
    assert kith("user", "list", "--json").out == "[]\n"
    r = kith("user")
    assert r.code == 2 and "required" in r.err


def test_user_list_table_json_and_tenant(kith: Kith) -> None:
    for address in ("zed@example.test", "ann@example.test", "bob@other.test"):
        assert kith("user", "add", address).code == 0
    assert kith("tenant", "add", "acme").code == 0
    assert kith("tenant", "domain", "acme", "other.test").code == 0
    assert kith("user", "disable", "zed@example.test").code == 0

    r = kith("user", "list")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["address", "tenant", "role", "status", "created"]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["ann@example.test", "default", "user", "enabled"],
        ["bob@other.test", "acme", "user", "enabled"],
        ["zed@example.test", "default", "user", "disabled"],
    ]

    r = kith("user", "list", "--json", "--tenant", "ACME")
    [doc] = json.loads(r.out)
    assert {k: doc[k] for k in ("address", "tenant", "role", "disabled")} == {
        "address": "bob@other.test",
        "tenant": "acme",
        "role": "user",
        "disabled": False,
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["created"])

    r = kith("user", "list", "--tenant", "nope")
    assert (r.code, r.err) == (1, "kith: error: no tenant named 'nope'\n")


def test_user_list_empty_says_so_on_stderr(kith: Kith) -> None:
    r = kith("user", "list")
    assert (r.code, r.out, r.err) == (0, "", "no users\n")


def test_user_remove(kith: Kith, database: Callable[[], Database]) -> None:
    assert kith("user", "add", "ann@example.test").code == 0
    r = kith("user", "remove", "Ann@Example.Test")
    assert (r.code, r.out) == (0, "removed user ann@example.test\n")
    assert database().find_user("ann@example.test") is None
    r = kith("user", "remove", "ann@example.test")
    assert (r.code, r.err) == (1, "kith: error: no user ann@example.test\n")


def test_user_passwd_generated_and_from_stdin(kith: Kith, database: Callable[[], Database]) -> None:
    first = password_of(kith("user", "add", "ann@example.test").out)
    r = kith("user", "passwd", "ann@example.test")
    assert r.code == 0, r.err
    assert r.out.startswith("changed the password of ann@example.test\n")
    second = password_of(r.out)
    d = database()
    assert d.verify_password("ann@example.test", first) is None
    assert d.verify_password("ann@example.test", second) is not None
    r = kith("user", "passwd", "ann@example.test", "--password-stdin", stdin="battery staple\n")
    assert (r.code, r.out) == (0, "changed the password of ann@example.test\n")
    assert d.verify_password("ann@example.test", second) is None
    assert d.verify_password("ann@example.test", "battery staple") is not None
    r = kith("user", "passwd", "bob@example.test")
    assert (r.code, r.out, r.err) == (1, "", "kith: error: no user bob@example.test\n")


def test_user_disable_and_enable(kith: Kith, database: Callable[[], Database]) -> None:
    kith("user", "add", "ann@example.test", "--password-stdin", stdin="correct horse\n")
    d = database()
    assert d.verify_password("ann@example.test", "correct horse") is not None
    r = kith("user", "disable", "ann@example.test")
    assert (r.code, r.out) == (0, "disabled ann@example.test\n")
    assert d.verify_password("ann@example.test", "correct horse") is None
    r = kith("user", "disable", "ann@example.test")
    assert (r.code, r.out) == (0, "ann@example.test was already disabled\n")
    r = kith("user", "enable", "ann@example.test")
    assert (r.code, r.out) == (0, "enabled ann@example.test\n")
    assert d.verify_password("ann@example.test", "correct horse") is not None
    r = kith("user", "enable", "nobody@example.test")
    assert (r.code, r.err) == (1, "kith: error: no user nobody@example.test\n")


# --- kith tenant -----------------------------------------------------------------------------


def test_tenant_add_and_list(kith: Kith) -> None:
    r = kith("tenant", "add", "Acme")
    assert (r.code, r.out) == (0, "added tenant acme\n")
    r = kith("tenant", "add", "acme")
    assert (r.code, r.err) == (1, "kith: error: tenant 'acme' exists already\n")
    r = kith("tenant", "add", "not a name")
    assert r.code == 2 and "invalid tenant name" in r.err
    kith("user", "add", "ann@example.test")
    r = kith("tenant", "list")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["tenant", "domains", "users", "created"]
    assert lines[1].split()[:3] == ["acme", "-", "0"]
    assert lines[2].split()[:4] == ["default", "example.test,", "other.test", "1"]
    doc = json.loads(kith("tenant", "list", "--json").out)
    assert [(t["name"], t["domains"], t["users"]) for t in doc] == [
        ("acme", [], 0),
        ("default", ["example.test", "other.test"], 1),
    ]


def test_tenant_domain_moves_domain_and_users(kith: Kith, database: Callable[[], Database]) -> None:
    kith("user", "add", "bob@other.test")
    kith("tenant", "add", "acme")
    r = kith("tenant", "domain", "acme", "Other.Test")
    assert (r.code, r.out) == (0, "other.test now belongs to tenant acme, with its users\n")
    r = kith("tenant", "domain", "acme", "other.test")
    assert (r.code, r.out) == (0, "other.test already belongs to tenant acme\n")
    d = database()
    d.sync_domains(["example.test", "other.test"])
    assert d.tenant_of("other.test") == "acme"
    assert d.tenant_of("example.test") == "default"
    bob = d.find_user("bob@other.test")
    assert bob is not None and bob.tenant == "acme"
    doc = json.loads(kith("tenant", "list", "--json").out)
    assert [(t["name"], t["domains"], t["users"]) for t in doc] == [
        ("acme", ["other.test"], 1),
        ("default", ["example.test"], 0),
    ]


def test_tenant_domain_refuses_what_is_not_there(kith: Kith, config_file: Path) -> None:
    kith("tenant", "add", "acme")
    r = kith("tenant", "domain", "acme", "elsewhere.test")
    assert r.code == 1
    assert r.err == (
        "kith: error: elsewhere.test is not a local domain: "
        f"add it to [domains] local in {config_file} first\n"
    )
    r = kith("tenant", "domain", "nope", "example.test")
    assert (r.code, r.err) == (1, "kith: error: no tenant named 'nope'\n")
    r = kith("tenant", "domain", "acme", "[192.0.2.1]")
    assert r.code == 2 and "address literals" in r.err


def test_a_domain_dropped_from_the_config_is_marked(
    kith: Kith, tmp_path: Path, data_dir: Path
) -> None:
    kith("user", "add", "bob@other.test")
    smaller = tmp_path / "smaller.toml"
    smaller.write_text(f'[server]\ndata_dir = "{data_dir}"\n[domains]\nlocal = ["example.test"]\n')
    r = kith("tenant", "list", config=smaller)
    assert "other.test (not local)" in r.out
    [doc] = json.loads(kith("tenant", "list", "--json", config=smaller).out)
    assert doc["inactive_domains"] == ["other.test"]
    # Its user keeps the account.
    assert "bob@other.test" in kith("user", "list", config=smaller).out


def test_data_dir_option_and_embedded_default(kith: Kith, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    r = kith("--data-dir", str(elsewhere), "user", "add", "ann@example.test", config=None)
    assert r.code == 0, r.err
    assert (elsewhere / "kithmail.db").exists()
    r = kith("user", "list", "--data-dir", str(elsewhere), config=None)
    assert "ann@example.test" in r.out
    r = kith("tenant", "domain", "default", "other.test", "--data-dir", str(elsewhere), config=None)
    assert r.code == 1
    assert "add it to [domains] local in a config file (-c FILE) first" in r.err
