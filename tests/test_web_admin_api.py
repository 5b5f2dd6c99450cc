"""The admin JSON API (/api/v1/admin) against a real `kith serve`: the pages' rules, for scripts.

The same two tenants as test_web_admin (acme: ann, boss its admin;
globex: bob, olga its admin; root a global admin). What a script's author
relies on: an API token made by an admin works as a bearer token and
carries exactly that admin's scope; a plain user gets 403 on every admin
call; a session needs X-CSRF-Token for every change, a token does not;
whatever ids a call names, a tenant admin reaches only their tenant;
policy answers say where each value comes from; bad input is a 4xx with
``{"error", "detail"}``, never a 500; the OpenAPI document describes it all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from gateway import Gateway, make_gateway
from test_web_admin import USERS, overrides, setup_tenants, user_row
from web_client import PASSWORD, WEB_SECTIONS, Web, held, hold, logged_in

from kithmail.db import Database

API = "/api/v1/admin"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = make_gateway(tmp_path_factory.mktemp("adminapi") / "gw", users=USERS, sections=WEB_SECTIONS)
    setup_tenants(g)
    g.start()
    try:
        yield g
    finally:
        try:
            g.stop()
        finally:
            g.kill()


class Bearer:
    """A script: no cookies, only the token."""

    def __init__(self, gw: Gateway, token: str) -> None:
        self.base = f"http://127.0.0.1:{gw.web_port}"
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, **kw: Any) -> requests.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        return requests.request(
            method, self.base + path, headers=headers, timeout=30, allow_redirects=False, **kw
        )


def token_for(gw: Gateway, address: str, name: str = "script") -> str:
    web = logged_in(gw, address)
    r = web.post(f"{API}/tokens", json={"name": name})
    assert r.status_code == 201, r.text
    secret: str = r.json()["secret"]
    assert secret.startswith("kith_")
    return secret


CALLS: list[tuple[str, str, Any]] = [
    ("GET", "/dashboard", None),
    ("GET", "/tenants", None),
    ("POST", "/tenants", {"name": "evilcorp"}),
    ("GET", "/tenants/acme", None),
    ("PUT", "/tenants/acme/domains/other.test", None),
    ("POST", "/tenants/acme/admins", {"address": "ann@example.test"}),
    ("GET", "/policy", None),
    ("PUT", "/policy/spf.softfail", {"value": "accept"}),
    ("DELETE", "/policy/spf.softfail", None),
    ("GET", "/users", None),
    ("POST", "/users", {"address": "mallory@example.test"}),
    ("GET", "/users/ann@example.test", None),
    ("PATCH", "/users/ann@example.test", {"role": "tenant_admin"}),
    ("POST", "/users/ann@example.test/password", None),
    ("GET", "/community", None),
    ("POST", "/community", {"entry": "@evil.test"}),
    ("DELETE", "/community?entry=@evil.test", None),
    ("GET", "/quarantine", None),
    ("GET", "/audit", None),
    ("GET", "/tokens", None),
    ("POST", "/tokens", {"name": "x"}),
    ("DELETE", "/tokens/1", None),
]
CHANGES = [c for c in CALLS if c[0] != "GET"]


def test_a_plain_user_gets_403_on_every_admin_call(gw: Gateway) -> None:
    ann = logged_in(gw, "ann@example.test")
    for method, path, body in CALLS:
        r = ann.request(method, API + path, json=body, headers={"X-CSRF-Token": ann.csrf})
        assert r.status_code == 403, (method, path, r.status_code)
        assert r.json()["error"] == "forbidden"
    assert user_row(gw, "ann@example.test").role == "user"
    # And without any login: 401, with the scheme to use.
    for method, path, body in CALLS:
        r = requests.request(method, Web(gw).url(API + path), json=body, timeout=30)
        assert r.status_code == 401, (method, path)
        assert r.headers["www-authenticate"] == "Bearer"


def test_a_session_needs_the_csrf_header_for_every_change(gw: Gateway) -> None:
    root = logged_in(gw, "root@example.test")
    before = overrides(gw)
    for method, path, body in CHANGES:
        r = root.request(method, API + path, json=body)
        assert r.status_code == 403, (method, path, r.status_code)
        assert "CSRF" in r.json()["detail"]
        r = root.request(
            method,
            API + path,
            json=body,
            headers={"X-CSRF-Token": root.csrf, "Origin": "http://evil.test"},
        )
        assert r.status_code == 403, (method, path)
    assert overrides(gw) == before
    assert user_row(gw, "ann@example.test").role == "user"


def test_a_token_acts_as_its_admin_with_that_admins_scope_and_no_more(gw: Gateway) -> None:
    script = Bearer(gw, token_for(gw, "boss@example.test", "scope script"))
    users = script.call("GET", f"{API}/users")
    assert users.status_code == 200
    seen = {u["address"] for u in users.json()}
    # acme's users (other tests of this module may have added more), never globex's.
    assert {"ann@example.test", "boss@example.test", "root@example.test"} <= seen
    assert all(a.endswith("@example.test") for a in seen), seen
    # No CSRF token needed: a browser never sends this header by itself.
    r = script.call("PUT", f"{API}/policy/spf.permerror", json={"value": "reject"})
    assert r.status_code == 200, r.text
    assert r.json()["origin"] == "tenant" and r.json()["value"] == "reject"
    assert overrides(gw)[("acme", "spf.permerror")] == '"reject"'
    # Whatever it names, another tenant stays out of reach.
    for method, path, body in [
        ("GET", "/users?tenant=globex", None),
        ("GET", "/policy?tenant=globex", None),
        ("PUT", "/policy/spf.permerror?tenant=globex", {"value": "reject"}),
        ("PUT", "/policy/spf.permerror?tenant=", {"value": "reject"}),  # the defaults
        ("DELETE", "/policy/spf.permerror?tenant=globex", None),
        ("GET", "/quarantine?tenant=globex", None),
        ("GET", "/audit?tenant=globex", None),
        ("GET", "/community?tenant=globex", None),
        ("GET", "/dashboard?tenant=globex", None),
        ("GET", "/tenants/globex", None),
        ("GET", "/tenants", None),
        ("POST", "/users", {"address": "eve@other.test"}),
    ]:
        r = script.call(method, API + path, json=body)
        assert r.status_code == 403, (method, path, r.status_code)
    for method, path, body in [
        ("GET", "/users/bob@other.test", None),
        ("PATCH", "/users/bob@other.test", {"disabled": True}),
        ("POST", "/users/olga@other.test/password", None),
    ]:
        r = script.call(method, API + path, json=body)
        assert r.status_code == 404, (method, path, r.status_code)
        assert r.json() == {"error": "not_found", "detail": "no such user"}
    assert not user_row(gw, "bob@other.test").disabled
    assert ("globex", "spf.permerror") not in overrides(gw)
    assert ("", "spf.permerror") not in overrides(gw)
    # Revoked: the token opens nothing any more.
    boss = logged_in(gw, "boss@example.test")
    [mine] = [t for t in boss.request("GET", f"{API}/tokens").json() if t["name"] == "scope script"]
    r = boss.request("DELETE", f"{API}/tokens/{mine['id']}", headers={"X-CSRF-Token": boss.csrf})
    assert r.status_code == 204
    assert script.call("GET", f"{API}/users").status_code == 401
    r = boss.request("DELETE", f"{API}/policy/spf.permerror", headers={"X-CSRF-Token": boss.csrf})
    assert r.status_code == 200 and r.json()["origin"] != "tenant"


def test_tokens_of_others_are_not_listed_or_revoked(gw: Gateway) -> None:
    token_for(gw, "olga@other.test", "olga's script")
    token_for(gw, "boss@example.test", "boss's script")
    boss = logged_in(gw, "boss@example.test")
    assert all(
        t["address"] == "boss@example.test" for t in boss.request("GET", f"{API}/tokens").json()
    )
    root = logged_in(gw, "root@example.test")
    [olgas] = [
        t for t in root.request("GET", f"{API}/tokens").json() if t["name"] == "olga's script"
    ]
    r = boss.request("DELETE", f"{API}/tokens/{olgas['id']}", headers={"X-CSRF-Token": boss.csrf})
    assert r.status_code == 404
    assert any(t["id"] == olgas["id"] for t in root.request("GET", f"{API}/tokens").json())
    # A global admin's tokens are the gateway's business, not their domain's tenant's.
    token_for(gw, "root@example.test", "root's script")
    seen = boss.request("GET", f"{API}/audit?action=token.").json()
    assert seen and {e["actor"] for e in seen} == {"web:boss@example.test"}
    assert "root's script" in {e["target"] for e in root.request("GET", f"{API}/audit").json()}
    # A plain user cannot make a token at all.
    ann = logged_in(gw, "ann@example.test")
    r = ann.request("POST", f"{API}/tokens", json={"name": "x"}, headers={"X-CSRF-Token": ann.csrf})
    assert r.status_code == 403


def test_policy_answers_say_where_values_come_from_and_refuse_bad_values(gw: Gateway) -> None:
    script = Bearer(gw, token_for(gw, "root@example.test"))
    rows = {r["key"]: r for r in script.call("GET", f"{API}/policy").json()}
    assert rows["spf.softfail"]["origin"] == "built-in"
    assert rows["spf.softfail"]["value"] == "quarantine"
    assert rows["recon.min_delay"]["tenant_may_override"] is False
    assert "reject" in rows["spf.softfail"]["choices"]
    r = script.call("PUT", f"{API}/policy/spf.softfail", json={"value": "defer"})
    assert r.status_code == 200 and r.json()["origin"] == "global"
    assert r.json()["replaces"] == "quarantine" and r.json()["replaces_origin"] == "built-in"
    try:
        tenant_rows = {
            x["key"]: x for x in script.call("GET", f"{API}/policy?tenant=globex").json()
        }
        assert tenant_rows["spf.softfail"]["origin"] == "global"
        assert "recon.min_delay" not in tenant_rows
        detail = script.call("GET", f"{API}/tenants/globex").json()
        assert detail["tenant"]["domains"] == ["other.test"]
        assert detail["tenant"]["admins"] == ["olga@other.test"]
        assert detail["overrides"] == []
        for key, value, words in [
            ("spf.softfail", "bounce", "spf.softfail"),
            ("recon.min_delay", "soon", "min_delay"),
            ("server.hostname", "x", "config file"),
            ("spf.sofftail", "reject", "did you mean"),
            ("spf.softfail", {"nested": 1}, "spf.softfail"),
        ]:
            r = script.call("PUT", f"{API}/policy/{key}", json={"value": value})
            assert r.status_code == 422, (key, r.status_code, r.text)
            assert r.json()["error"] == "invalid" and words in r.json()["detail"], r.json()
        boss = Bearer(gw, token_for(gw, "boss@example.test"))
        r = boss.call("PUT", f"{API}/policy/recon.min_delay", json={"value": "1s"})
        assert r.status_code == 422 and "only a global admin" in r.json()["detail"]
        audit = script.call("GET", f"{API}/audit?action=policy.&target=spf.softfail").json()
        assert audit and audit[0]["actor"] == "api:root@example.test"
        assert audit[0]["action"] == "policy.set" and audit[0]["tenant"] == ""
    finally:
        r = script.call("DELETE", f"{API}/policy/spf.softfail")
        assert r.status_code == 200 and r.json()["origin"] == "built-in"


def test_users_through_the_api(gw: Gateway) -> None:
    script = Bearer(gw, token_for(gw, "boss@example.test"))
    r = script.call("POST", f"{API}/users", json={"address": "Dave@Example.TEST"})
    assert r.status_code == 201
    created = r.json()
    assert created["user"]["address"] == "dave@example.test"
    assert created["user"]["tenant"] == "acme" and created["user"]["role"] == "user"
    assert logged_in(gw, "dave@example.test", created["password"]).session_cookie
    assert (
        script.call("POST", f"{API}/users", json={"address": "dave@example.test"}).status_code
        == 409
    )
    r = script.call("PATCH", f"{API}/users/dave@example.test", json={"disabled": True})
    assert r.status_code == 200 and r.json()["disabled"] is True
    r = script.call("POST", f"{API}/users/dave@example.test/password")
    assert r.status_code == 200 and len(r.json()["password"]) >= 16
    r = script.call("PATCH", f"{API}/users/dave@example.test", json={"role": "global_admin"})
    assert r.status_code == 403
    assert (
        script.call("PATCH", f"{API}/users/boss@example.test", json={"disabled": True}).status_code
        == 422
    )
    for bad in [
        {"address": "no-at-sign"},
        {"address": "x@elsewhere.test"},
        {"address": "x" * 400 + "@example.test"},
        {"address": "x@example.test", "role": "root"},
        {"address": "x@example.test", "password": "short"},
    ]:
        r = script.call("POST", f"{API}/users", json=bad)
        assert r.status_code == 422, (bad, r.status_code)
        assert set(r.json()) == {"error", "detail"}
    names = {u["address"] for u in script.call("GET", f"{API}/users?q=dave").json()}
    assert names == {"dave@example.test"}


def test_held_mail_community_and_dashboard_through_the_api(gw: Gateway) -> None:
    [copy] = hold(gw, ["ann@example.test"], subject="api held")
    [bobs] = hold(gw, ["bob@other.test"], subject="not acme's")
    script = Bearer(gw, token_for(gw, "boss@example.test"))
    # Another tenant's held copy can be neither read nor acted on, by its ids.
    where = f"/api/v1/quarantine/{bobs['queue_id']}/{bobs['rcpt_index']}"
    assert script.call("GET", where).status_code == 404
    for action in ("release", "delete", "block"):
        assert script.call("POST", f"{where}/{action}").status_code == 404
    assert script.call("GET", "/api/v1/quarantine?user=bob@other.test").status_code in (403, 404)
    assert [h["queue_id"] for h in held(gw, "bob@other.test")] == [bobs["queue_id"]]
    page = script.call("GET", f"{API}/quarantine").json()
    subjects = {i["subject"] for i in page["items"]}
    assert "api held" in subjects and "not acme's" not in subjects
    assert {i["tenant"] for i in page["items"]} == {"acme"}
    # B's message call serves an admin the copy of a user of their tenant.
    r = script.call("GET", f"/api/v1/quarantine/{copy['queue_id']}/{copy['rcpt_index']}")
    assert r.status_code == 200
    olga = Bearer(gw, token_for(gw, "olga@other.test"))
    r = olga.call("GET", f"/api/v1/quarantine/{copy['queue_id']}/{copy['rcpt_index']}")
    assert r.status_code == 404
    r = script.call("POST", f"{API}/community", json={"entry": "@friends.test", "kind": "allow"})
    assert r.status_code == 201 and r.json()["entry"] == "@friends.test"
    assert r.json()["source"] == "admin"
    assert [e["entry"] for e in script.call("GET", f"{API}/community").json()] == ["@friends.test"]
    assert olga.call("GET", f"{API}/community").json() == []
    r = script.call("DELETE", f"{API}/community?entry=@friends.test")
    assert r.status_code == 204
    assert script.call("DELETE", f"{API}/community?entry=@friends.test").status_code == 404
    d = script.call("GET", f"{API}/dashboard").json()
    assert d["tenant"] == "acme" and d["held"] >= 1 and d["queue_messages"] is None
    assert set(d["today_by_layer"]) >= {"recon", "reputation", "spoofing", "antivirus", "community"}
    assert d["today_by_layer"]["community"].get("quarantine", 0) >= 1
    root = Bearer(gw, token_for(gw, "root@example.test"))
    whole = root.call("GET", f"{API}/dashboard").json()
    assert whole["tenant"] is None and isinstance(whole["queue_messages"], int)
    assert whole["today_by_tenant"]["acme"]["quarantine"] >= 1
    assert d["today_by_tenant"] == {}  # a tenant's view names no other tenant


def test_bad_input_is_a_4xx_never_a_500(gw: Gateway) -> None:
    script = Bearer(gw, token_for(gw, "root@example.test"))
    for method, path, kw in [
        ("GET", "/users?tenant=" + "x" * 500, {}),
        ("GET", "/users?tenant=NO%20SPACES", {}),
        ("GET", "/audit?limit=100000", {}),
        ("GET", "/audit?before=-1", {}),
        ("GET", "/audit?until=4585236637999400222720", {}),  # past SQLite's 64 bits
        ("GET", "/audit?before=99999999999999999999", {}),
        ("GET", "/quarantine?offset=-5", {}),
        (
            "PUT",
            "/policy/spf.softfail",
            {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
        ),
        ("PUT", "/policy/" + "k" * 300, {"json": {"value": 1}}),
        ("POST", "/tenants", {"json": {"name": "../etc"}}),
        ("PUT", "/tenants/acme/domains/not a domain", {}),
        ("PUT", "/tenants/nonesuch/domains/example.test", {}),
        ("POST", "/community?tenant=acme", {"json": {"entry": "\u202e@x.test"}}),
        ("GET", "/users/%00", {}),
        ("DELETE", "/tokens/99999999", {}),
        ("POST", "/tokens", {"json": {"name": "", "days": 0}}),
    ]:
        r = script.call(method, API + path, **kw)
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
        assert set(r.json()) == {"error", "detail"}, r.text


def test_the_openapi_document_describes_the_admin_calls(gw: Gateway) -> None:
    doc = requests.get(Web(gw).url("/api/v1/openapi.json"), timeout=30).json()
    paths = doc["paths"]
    for path in (
        "/api/v1/admin/dashboard",
        "/api/v1/admin/tenants",
        "/api/v1/admin/tenants/{name}",
        "/api/v1/admin/policy",
        "/api/v1/admin/policy/{key}",
        "/api/v1/admin/users",
        "/api/v1/admin/users/{address}",
        "/api/v1/admin/community",
        "/api/v1/admin/quarantine",
        "/api/v1/admin/audit",
        "/api/v1/admin/tokens",
    ):
        assert path in paths, path
    assert "put" in paths["/api/v1/admin/policy/{key}"]
    assert not any(p.startswith("/admin") for p in paths)  # the pages are not API


def test_a_global_admin_provisions_a_tenant_by_script(tmp_path: Any) -> None:
    g = make_gateway(tmp_path / "gw", users=USERS, sections=WEB_SECTIONS)
    setup_tenants(g)
    g.start()
    try:
        script = Bearer(g, token_for(g, "root@example.test"))
        r = script.call("POST", f"{API}/tenants", json={"name": "initech"})
        assert r.status_code == 201 and r.json()["domains"] == []
        r = script.call("PUT", f"{API}/tenants/initech/domains/other.test")
        assert r.status_code == 200 and r.json()["domains"] == ["other.test"]
        r = script.call(
            "POST", f"{API}/users", json={"address": "peter@other.test", "password": PASSWORD}
        )
        assert r.status_code == 201 and r.json()["user"]["tenant"] == "initech"
        r = script.call(
            "POST", f"{API}/tenants/initech/admins", json={"address": "peter@other.test"}
        )
        assert r.status_code == 200 and r.json()["role"] == "tenant_admin"
        r = script.call(
            "PUT", f"{API}/policy/spf.softfail?tenant=initech", json={"value": "reject"}
        )
        assert r.status_code == 200 and r.json()["origin"] == "tenant"
        peter = Bearer(g, token_for(g, "peter@other.test", "peter"))
        rows = {x["key"]: x for x in peter.call("GET", f"{API}/policy").json()}
        assert rows["spf.softfail"]["value"] == "reject"
        r = script.call("PUT", f"{API}/tenants/initech/domains/unknown.test")
        assert r.status_code == 422 and "[domains] local" in r.json()["detail"]
        with Database.open(g.data_dir / "kithmail.db") as d:
            assert d.tenant("initech").users == 3
    finally:
        try:
            g.stop()
        finally:
            g.kill()


def test_the_last_global_admin_cannot_be_demoted_or_disable_themself(gw: Gateway) -> None:
    script = Bearer(gw, token_for(gw, "root@example.test"))
    r = script.call("PATCH", f"{API}/users/root@example.test", json={"role": "user"})
    assert r.status_code == 422 and "last enabled global admin" in r.json()["detail"]
    r = script.call("PATCH", f"{API}/users/root@example.test", json={"disabled": True})
    assert r.status_code == 422
    root = user_row(gw, "root@example.test")
    assert (root.role, root.disabled) == ("global_admin", False)
