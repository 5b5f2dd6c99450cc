"""The admin pages against a real `kith serve`: who may see and change what.

Two tenants on one gateway: acme (example.test: ann, and boss its tenant
admin) and globex (other.test: bob, and olga its tenant admin); root is a
global admin. What an admin checks: a plain user reaches no admin page; a
tenant admin sees and changes only their own tenant's users, policy, held
mail, community and audit entries, whatever a URL or a form names, never a
global-only key nor the defaults; every admin form needs the session's
CSRF token; a policy change says where each value comes from and is
recorded; users are added, disabled, reset and promoted; the dashboard
counts what the gateway decided and draws it without any script.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway import Gateway, make_gateway, message, run, send
from web_client import PASSWORD, SECURITY_HEADERS, WEB_SECTIONS, Web, hold, logged_in

from kithmail.db import Database

USERS = ("ann@example.test", "boss@example.test", "bob@other.test", "olga@other.test")


def setup_tenants(gw: Gateway) -> None:
    """acme owns example.test, globex other.test; boss and olga admin them; root is global."""
    with Database.open(gw.data_dir / "kithmail.db") as d:
        d.sync_domains(["example.test", "other.test"])
        d.add_tenant("acme")
        d.add_tenant("globex")
        d.set_domain_tenant("example.test", "acme")
        d.set_domain_tenant("other.test", "globex")
        d.set_role("boss@example.test", "tenant_admin")
        d.set_role("olga@other.test", "tenant_admin")
        d.add_user("root@example.test", password=PASSWORD, role="global_admin")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = make_gateway(tmp_path_factory.mktemp("admin") / "gw", users=USERS, sections=WEB_SECTIONS)
    setup_tenants(g)
    g.start()
    try:
        yield g
    finally:
        try:
            g.stop()
        finally:
            g.kill()


def overrides(gw: Gateway) -> dict[tuple[str, str], str]:
    with Database.open(gw.data_dir / "kithmail.db") as d:
        return {
            (str(s), str(k)): str(v)
            for s, k, v in d.read("SELECT scope, key, value FROM overrides")
        }


def user_row(gw: Gateway, address: str) -> Any:
    with Database.open(gw.data_dir / "kithmail.db") as d:
        return d.user(address)


PAGES = [
    "/admin",
    "/admin/dashboard",
    "/admin/users",
    "/admin/users/ann%40example.test",
    "/admin/policy",
    "/admin/community",
    "/admin/quarantine",
    "/admin/audit",
    "/admin/tokens",
    "/admin/tenants",
    "/admin/tenants/acme",
]
FORMS: list[tuple[str, dict[str, str]]] = [
    ("/admin/users", {"address": "mallory@example.test", "role": "user"}),
    ("/admin/users/ann%40example.test/disable", {}),
    ("/admin/users/ann%40example.test/enable", {}),
    ("/admin/users/ann%40example.test/password", {}),
    ("/admin/users/ann%40example.test/role", {"role": "tenant_admin"}),
    ("/admin/policy", {"key": "spf.softfail", "value": "accept", "tenant": "acme"}),
    ("/admin/policy/unset", {"key": "spf.softfail", "tenant": "acme"}),
    ("/admin/community", {"entry": "@evil.test", "kind": "allow", "tenant": "acme"}),
    ("/admin/community/remove", {"entry": "@evil.test", "tenant": "acme"}),
    ("/admin/tokens", {"name": "script"}),
    ("/admin/tokens/1/revoke", {}),
    ("/admin/tenants", {"name": "evilcorp"}),
    ("/admin/tenants/acme/domains", {"domain": "other.test"}),
    ("/admin/tenants/acme/admins", {"address": "ann@example.test"}),
]


def test_a_plain_user_reaches_no_admin_page_and_changes_nothing(gw: Gateway) -> None:
    ann = logged_in(gw, "ann@example.test")
    for path in PAGES:
        r = ann.get(path)
        assert r.status_code == 403, (path, r.status_code)
        assert "administrators only" in r.text
    before = overrides(gw)
    for path, form in FORMS:
        r = ann.post(path, form)
        assert r.status_code == 403, (path, r.status_code)
    assert overrides(gw) == before
    assert user_row(gw, "ann@example.test").role == "user"
    assert not user_row(gw, "ann@example.test").disabled
    # No admin links in a user's navigation.
    assert "/admin/" not in ann.get("/quarantine").text
    # Nobody logged in: to the login page.
    anon = Web(gw)
    for path in PAGES:
        r = anon.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path


def test_admin_pages_carry_the_security_headers_and_no_script_of_their_own(gw: Gateway) -> None:
    root = logged_in(gw, "root@example.test")
    for path in PAGES:
        r = root.get(path)
        assert r.status_code in (200, 303), (path, r.status_code)
        for name, value in SECURITY_HEADERS.items():
            assert r.headers.get(name) == value, (path, name)
        if r.status_code == 200:
            assert "<script" not in r.text.replace('<script src="/static/kithmail.js" defer>', "")
            assert " style=" not in r.text and "onclick" not in r.text


def test_every_admin_form_needs_the_csrf_token(gw: Gateway) -> None:
    root = logged_in(gw, "root@example.test")
    before = overrides(gw)
    for path, form in FORMS:
        r = root.post(path, form, csrf=False)
        assert r.status_code == 403, (path, r.status_code)
        assert "CSRF" in r.text
        forged = root.post(path, form, headers={"Origin": "http://evil.test"})
        assert forged.status_code == 403, (path, forged.status_code)
    assert overrides(gw) == before
    assert "evilcorp" not in {t.name for t in _tenants(gw)}
    assert user_row(gw, "ann@example.test").role == "user"


def _tenants(gw: Gateway) -> list[Any]:
    with Database.open(gw.data_dir / "kithmail.db") as d:
        return d.tenants()


def test_a_tenant_admin_sees_only_their_tenants_users(gw: Gateway) -> None:
    boss = logged_in(gw, "boss@example.test")
    page = boss.get("/admin/users").text
    assert "ann@example.test" in page and "boss@example.test" in page
    assert "bob@other.test" not in page and "olga@other.test" not in page
    assert boss.get("/admin/users?tenant=globex").status_code == 403
    assert boss.get("/admin/users?tenant=nonesuch").status_code == 403  # nothing learnt
    # Another tenant's user is "not found", exactly as a user who does not exist.
    for address in ("bob%40other.test", "olga%40other.test", "nobody%40example.test"):
        r = boss.get(f"/admin/users/{address}")
        assert r.status_code == 404, address
    for path in ("disable", "password", "role"):
        r = boss.post(f"/admin/users/bob%40other.test/{path}", {"role": "tenant_admin"})
        assert r.status_code == 404
    bob = user_row(gw, "bob@other.test")
    assert (bob.disabled, bob.role) == (False, "user")
    # Nor can they add a user to a domain that is not theirs.
    r = boss.post("/admin/users", {"address": "eve@other.test", "role": "user"})
    assert r.status_code == 403
    with Database.open(gw.data_dir / "kithmail.db") as d:
        assert d.find_user("eve@other.test") is None
    # Tenants are the global admins' business.
    assert boss.get("/admin/tenants").status_code == 403
    assert boss.get("/admin/tenants/globex").status_code == 403
    assert boss.get("/admin/tenants/acme").status_code == 200


def test_a_tenant_admin_changes_only_their_tenants_policy(gw: Gateway) -> None:
    boss = logged_in(gw, "boss@example.test")
    assert boss.get("/admin/policy?tenant=globex").status_code == 403
    page = boss.get("/admin/policy").text
    # Recon's timings are shared by every tenant: not offered to a tenant admin.
    assert 'data-key="recon.enabled"' in page
    assert 'data-key="recon.min_delay"' not in page
    r = boss.post("/admin/policy", {"key": "spf.softfail", "value": "reject", "tenant": "globex"})
    assert r.status_code == 403
    # No form of theirs can name the defaults: an empty scope is their own tenant.
    r = boss.post("/admin/policy", {"key": "spf.softfail", "value": "reject", "tenant": ""})
    assert r.status_code == 303
    assert overrides(gw) == {("acme", "spf.softfail"): '"reject"'}
    assert (
        boss.post("/admin/policy/unset", {"key": "spf.softfail", "tenant": ""}).status_code == 303
    )
    assert overrides(gw) == {}
    r = boss.post("/admin/policy", {"key": "recon.min_delay", "value": "1s", "tenant": "acme"})
    assert r.status_code == 422
    assert "only a global admin" in r.text
    r = boss.post("/admin/policy", {"key": "spf.softfail", "value": "bounce", "tenant": "acme"})
    assert r.status_code == 422
    assert "spf.softfail" in r.text
    assert not [k for k in overrides(gw) if k[1] in ("spf.softfail", "recon.min_delay")]


def test_policy_shows_where_each_value_comes_from_and_changes_are_audited(gw: Gateway) -> None:
    boss = logged_in(gw, "boss@example.test")
    root = logged_in(gw, "root@example.test")
    olga = logged_in(gw, "olga@other.test")
    try:
        r = boss.post("/admin/policy", {"key": "spf.neutral", "value": "quarantine"})
        assert r.status_code == 303
        row = _row(boss.get(r.headers["location"]).text, "spf.neutral")
        assert "quarantine" in row and "origin-tenant" in row
        assert "replaces accept (built-in)" in row
        assert overrides(gw)[("acme", "spf.neutral")] == '"quarantine"'
        # A global override beneath it: acme's still wins, and now replaces it.
        r = root.post("/admin/policy", {"key": "spf.neutral", "value": "tag", "tenant": ""})
        assert r.status_code == 303
        assert "replaces tag (global)" in _row(boss.get("/admin/policy").text, "spf.neutral")
        row = _row(olga.get("/admin/policy").text, "spf.neutral")
        assert '<td data-label="In force" class="value">tag</td>' in row and "origin-global" in row
        # The tenant's page sets its overrides beside what they replace.
        tenant_page = root.get("/admin/tenants/acme").text
        assert 'data-key="spf.neutral"' in tenant_page and "origin-global" in tenant_page
        # Recorded, and a tenant admin sees their tenant's entries only.
        audit = boss.get("/admin/audit?action=policy.").text
        assert "web:boss@example.test" in audit and "spf.neutral" in audit
        assert "web:root@example.test" not in audit  # the global override is not acme's
        assert "web:root@example.test" in root.get("/admin/audit?action=policy.").text
        assert boss.get("/admin/audit?tenant=globex").status_code == 403
    finally:
        assert (
            root.post("/admin/policy/unset", {"key": "spf.neutral", "tenant": ""}).status_code
            == 303
        )
        r = boss.post("/admin/policy/unset", {"key": "spf.neutral"})
        assert r.status_code == 303
    assert ("acme", "spf.neutral") not in overrides(gw)
    assert "origin-built-in" in _row(boss.get("/admin/policy").text, "spf.neutral")


def test_a_global_admin_sees_the_reputation_lists_beside_the_policy(gw: Gateway) -> None:
    listed = gw.root / "spammers.txt"
    listed.write_text("# known spammers\n203.0.113.0/24\n198.51.100.7\n")
    gw.kith("reputation", "load", str(listed), "--name", "spammers", "--kind", "block")
    page = logged_in(gw, "root@example.test").get("/admin/policy").text
    m = re.search(r'<table class="list" id="reputation-lists">(.*?)</table>', page, re.S)
    assert m and "spammers" in m[1] and ">2</td>" in m[1] and "reject" in m[1]
    # A tenant's view has no such table: the lists are the gateway's.
    assert (
        'id="reputation-lists"' not in logged_in(gw, "boss@example.test").get("/admin/policy").text
    )


def _row(page: str, key: str) -> str:
    m = re.search(rf'<tr data-key="{re.escape(key)}"[^>]*>(.*?)</tr>', page, re.S)
    assert m, f"no row for {key}"
    return m[1]


def test_users_are_added_disabled_reset_and_promoted(gw: Gateway) -> None:
    boss = logged_in(gw, "boss@example.test")
    r = boss.post("/admin/users", {"address": "carol@example.test", "role": "user"})
    assert r.status_code == 200
    password = re.search(r'<pre class="headers" id="password">([^<]+)</pre>', r.text)
    assert password
    carol = logged_in(gw, "carol@example.test", password[1])
    assert carol.get("/quarantine").status_code == 200
    # Disabled: her session ends at once, and she cannot log in.
    assert boss.post("/admin/users/carol%40example.test/disable").status_code == 303
    assert carol.get("/quarantine").status_code == 303
    assert Web(gw).login("carol@example.test", password[1]).status_code == 401
    assert boss.post("/admin/users/carol%40example.test/enable").status_code == 303
    # A reset password: the old one no longer works, the new one does.
    r = boss.post("/admin/users/carol%40example.test/password")
    new = re.search(r'id="password">([^<]+)<', r.text)
    assert new and new[1] != password[1]
    assert Web(gw).login("carol@example.test", password[1]).status_code == 401
    carol = logged_in(gw, "carol@example.test", new[1])
    # Made a tenant admin: she reaches the admin pages, of acme only.
    assert carol.get("/admin/users").status_code == 403
    assert (
        boss.post("/admin/users/carol%40example.test/role", {"role": "tenant_admin"}).status_code
        == 303
    )
    assert carol.get("/admin/users").status_code == 200
    # A tenant admin never makes a global admin, nor changes one.
    r = boss.post("/admin/users/carol%40example.test/role", {"role": "global_admin"})
    assert r.status_code == 403
    assert boss.post("/admin/users/root%40example.test/disable").status_code == 403
    assert not user_row(gw, "root@example.test").disabled
    assert (
        boss.post("/admin/users", {"address": "x@example.test", "role": "global_admin"}).status_code
        == 403
    )
    audit = boss.get("/admin/audit?target=carol").text
    for action in ("user.add", "user.disable", "user.enable", "user.password_reset", "user.role"):
        assert action in audit


def test_held_mail_of_any_user_of_the_tenant_and_no_other(gw: Gateway) -> None:
    [ann_copy] = hold(gw, ["ann@example.test"], subject="for ann")
    [bob_copy] = hold(gw, ["bob@other.test"], subject="for bob")
    boss = logged_in(gw, "boss@example.test")
    olga = logged_in(gw, "olga@other.test")
    mine = boss.get("/admin/quarantine").text
    assert "for ann" in mine and "for bob" not in mine
    link = f"/quarantine/{ann_copy['queue_id']}/{ann_copy['rcpt_index']}"
    assert link in mine
    assert boss.get(link).status_code == 200
    assert olga.get(link).status_code == 404
    assert "for ann" not in olga.get("/admin/quarantine").text
    assert boss.get("/admin/quarantine?tenant=globex").status_code == 403
    assert "for bob" not in boss.get("/admin/quarantine?user=bob%40other.test").text
    root = logged_in(gw, "root@example.test")
    every = root.get("/admin/quarantine").text
    assert "for ann" in every and "for bob" in every
    assert "for ann" not in root.get("/admin/quarantine?tenant=globex").text
    assert bob_copy["queue_id"] in root.get("/admin/quarantine?tenant=globex").text


def test_the_organisations_community(gw: Gateway) -> None:
    boss = logged_in(gw, "boss@example.test")
    r = boss.post("/admin/community", {"entry": "@Partner.TEST", "kind": "allow"})
    assert r.status_code == 303
    page = boss.get("/admin/community").text
    assert "@partner.test" in page
    listed = gw.kith("community", "list", "tenant:acme").stdout
    assert "@partner.test" in listed
    assert "@partner.test" not in gw.kith("community", "list", "tenant:globex", check=False).stdout
    r = boss.post("/admin/community", {"entry": "@x.test", "kind": "allow", "tenant": "globex"})
    assert r.status_code == 403
    assert (
        boss.post("/admin/community", {"entry": "not an entry!", "kind": "allow"}).status_code
        == 422
    )
    assert boss.post("/admin/community/remove", {"entry": "@partner.test"}).status_code == 303
    assert "@partner.test" not in gw.kith("community", "list", "tenant:acme", check=False).stdout
    assert "community.allow" in boss.get("/admin/audit?action=community").text


def test_the_dashboard_counts_what_the_gateway_decided(gw: Gateway) -> None:
    # 127.0.1.9 is outside the Recon exemption: its first message is deferred.
    replies = run(send(gw.port, "127.0.1.9", "x@remote.test", ["ann@example.test"], message()))
    assert replies[2].code == 451
    boss = logged_in(gw, "boss@example.test")
    page = boss.get("/admin/dashboard").text
    assert re.search(r'<dd id="today-defer">[1-9]\d*</dd>', page), page
    assert "127.0.1.0/24" in page
    assert page.count("<svg") == 3 and "<title>" in page
    m = re.search(r'<tr data-layer="recon">(.*?)</tr>', page, re.S)
    assert m and '<td data-label="defer today">1</td>' in m[1]
    # globex saw none of it.
    other = logged_in(gw, "olga@other.test").get("/admin/dashboard").text
    assert '<dd id="today-defer">0</dd>' in other and "127.0.1.0/24" not in other
    assert boss.get("/admin/dashboard?tenant=globex").status_code == 403
    root = logged_in(gw, "root@example.test").get("/admin/dashboard").text
    assert 'id="queue"' in root and "127.0.1.0/24" in root
    acme = re.search(r'<tr data-tenant="acme">(.*?)</tr>', root, re.S)
    assert acme and re.search(r'<td data-label="defer">[1-9]\d*</td>', acme[1])


def test_a_global_admin_runs_tenants(tmp_path: Path) -> None:
    g = make_gateway(tmp_path / "gw", users=USERS, sections=WEB_SECTIONS)
    setup_tenants(g)
    g.start()
    try:
        root = logged_in(g, "root@example.test")
        r = root.post("/admin/tenants", {"name": "Initech"})
        assert r.status_code == 303 and r.headers["location"].startswith("/admin/tenants/initech")
        assert root.post("/admin/tenants", {"name": "initech"}).status_code == 409
        assert root.post("/admin/tenants", {"name": "no spaces"}).status_code == 422
        # A domain that is not in [domains] local: the page says where to add it.
        r = root.post("/admin/tenants/initech/domains", {"domain": "new.test"})
        assert r.status_code == 422 and "[domains] local" in r.text
        r = root.post("/admin/tenants/initech/domains", {"domain": "other.test"})
        assert r.status_code == 303
        assert "other.test" in root.get("/admin/tenants/initech").text
        assert user_row(g, "bob@other.test").tenant == "initech"
        # Mail for other.test is now initech's: its users move with it.
        r = root.post("/admin/tenants/initech/admins", {"address": "bob@other.test"})
        assert r.status_code == 303
        assert user_row(g, "bob@other.test").role == "tenant_admin"
        r = root.post("/admin/tenants/initech/admins", {"address": "ann@example.test"})
        assert r.status_code == 422  # ann is acme's
        bob = logged_in(g, "bob@other.test")
        assert "olga@other.test" in bob.get("/admin/users").text
        assert "ann@example.test" not in bob.get("/admin/users").text
        # Admins belong to their domain's tenant too: olga moved with other.test.
        assert user_row(g, "olga@other.test").tenant == "initech"
        assert "globex" in root.get("/admin/tenants").text
        audit = root.get("/admin/audit?action=tenant.").text
        assert "tenant.add" in audit and "tenant.domain" in audit
    finally:
        try:
            g.stop()
        finally:
            g.kill()


def test_every_state_changing_admin_route_depends_on_csrf() -> None:
    """A route added later without the CSRF check fails here, before any browser finds it."""
    from fastapi.routing import APIRoute

    from kithmail.web import admin, api_admin
    from kithmail.web.security import csrf

    changing = 0
    for router in (admin.router, api_admin.router):
        for route in router.routes:
            assert isinstance(route, APIRoute)
            if route.methods <= {"GET", "HEAD"}:
                continue
            changing += 1
            deps = [d.call for d in route.dependant.dependencies]
            assert csrf in deps, f"{sorted(route.methods)} {route.path} has no CSRF check"
    assert changing >= 25


def test_a_huge_page_number_is_refused_not_a_server_error(gw: Gateway) -> None:
    root = logged_in(gw, "root@example.test")
    for path in (
        "/admin/audit?before=99999999999999999999",
        "/admin/audit?since=99999-99-99",
        "/admin/quarantine?page=99999999999999999999",
        "/admin/tokens/99999999999999999999/revoke",
    ):
        r = root.post(path) if path.endswith("revoke") else root.get(path)
        assert 400 <= r.status_code < 500, (path, r.status_code)
