"""The JSON API under /api/v1 against a real `kith serve`: isolation, CSRF, tokens, admins.

Two tenants: ``default`` (example.test) and ``acme`` (other.test), each with
users and a tenant admin, and a global admin. Every rule is tried the way
an attacker would: another user's ids in the URL, in the body, in
``?user=``; a session request without its CSRF token or from another
origin; no credentials at all, on every operation the OpenAPI document
lists.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from gateway import Gateway, running_gateway
from web_client import PASSWORD, WEB_SECTIONS, Web, held, hold, logged_in

from kithmail.db import Database
from kithmail.web.auth import create_api_token

ANN, BOB = "ann@example.test", "bob@example.test"
TAD = "tad@example.test"  # tenant admin of default
OTTO, OLGA = "otto@other.test", "olga@other.test"  # a user and the tenant admin of acme
GIL = "gil@example.test"  # global admin


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(
        tmp_path_factory.mktemp("web-api") / "gw", users=(ANN, BOB, OTTO), sections=WEB_SECTIONS
    ) as g:
        g.kith("tenant", "add", "acme")
        g.kith("tenant", "domain", "acme", "other.test")
        for address, role in ((TAD, "tenant_admin"), (OLGA, "tenant_admin"), (GIL, "global_admin")):
            g.kith("user", "add", address, "--role", role, "--password-stdin", input=PASSWORD)
        yield g


def _token(gw: Gateway, address: str) -> requests.Session:
    with Database.open(gw.data_dir / "kithmail.db") as db:
        secret = create_api_token(db, db.user(address).id, f"tests {address}", ttl_s=None)
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {secret}"
    return s


def _api(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.web_port}/api/v1"


def test_a_user_reaches_only_their_own_mail_whatever_the_request_names(gw: Gateway) -> None:
    ann_copy, bob_copy = hold(gw, [ANN, BOB], subject="api isolation")
    qid, bob_i = bob_copy["queue_id"], bob_copy["rcpt_index"]
    api = _api(gw)
    session = logged_in(gw, ANN)
    token = _token(gw, ANN)

    def both(method: str, path: str, **kw: Any) -> list[requests.Response]:
        """The same request by session (with its CSRF token) and by API token."""
        headers = {"X-CSRF-Token": session.csrf}
        return [
            session.s.request(method, api + path, headers=headers, timeout=30, **kw),
            token.request(method, api + path, timeout=30, **kw),
        ]

    listing = both("GET", "/quarantine")
    for r in listing:
        assert [(i["queue_id"], i["rcpt_index"]) for i in r.json()["items"]] == [
            (qid, ann_copy["rcpt_index"])
        ]
        assert r.json()["total"] == 1
    # Bob's mail by ?user=, by URL, by action, in a bulk body: the same 404 as nothing.
    for method, path, kw in (
        ("GET", f"/quarantine?user={BOB}", {}),
        ("GET", f"/quarantine/{qid}/{bob_i}", {}),
        ("GET", "/quarantine?user=nobody@example.test", {}),
        *(
            ("POST", f"/quarantine/{qid}/{bob_i}/{a}", {})
            for a in ("release", "allow-release", "allow-list-release", "block", "delete")
        ),
    ):
        for r in both(method, path, **kw):
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"] == "not_found"
    for r in both(
        "POST", "/quarantine/actions", json={"action": "delete", "items": [[qid, bob_i]]}
    ):
        assert r.status_code == 200
        assert r.json()["failed"] == 1 and r.json()["results"][0]["error"] == "not_found"
    # A body that names a user where none is asked for is refused, not obeyed.
    for r in both(
        "POST",
        "/quarantine/actions",
        json={"action": "delete", "items": [[qid, bob_i]], "user": BOB},
    ):
        assert r.status_code == 422
    assert [h["rcpt_index"] for h in held(gw, BOB)] == [bob_i]

    # Bob's community: not readable, not writable, whatever the route.
    gw.kith("community", "add", BOB, "bobs.friend@remote.test")
    for method, path, kw in (
        ("GET", f"/community?user={BOB}", {}),
        ("POST", f"/community?user={BOB}", {"json": {"entry": "x@evil.test"}}),
        ("DELETE", f"/community?user={BOB}&entry=bobs.friend@remote.test", {}),
        ("POST", f"/community/import?user={BOB}", {"json": {"csv": "y@evil.test\n"}}),
        ("GET", f"/community/export?user={BOB}", {}),
    ):
        for r in both(method, path, **kw):
            assert r.status_code == 404, (method, path, r.text)
    bobs = gw.kith("community", "list", BOB).stdout
    assert "bobs.friend@remote.test" in bobs and "evil.test" not in bobs
    # Removing "his" entry from her own community finds nothing to remove.
    for r in both("DELETE", "/community?entry=bobs.friend@remote.test"):
        assert r.status_code == 404
    assert "bobs.friend@remote.test" in gw.kith("community", "list", BOB).stdout

    # Her own copy: found and released, with her name in the audit.
    r = token.post(f"{api}/quarantine/{qid}/{ann_copy['rcpt_index']}/release", timeout=30)
    assert r.status_code == 200 and r.json()["ok"] is True
    gw.wait_for("ann's copy", lambda: gw.messages(ANN))
    assert gw.messages(BOB) == [] and len(held(gw, BOB)) == 1


def test_session_calls_need_the_csrf_token_and_tokens_do_not(gw: Gateway) -> None:
    (copy,) = hold(gw, [BOB], subject="api csrf")
    qid, i = copy["queue_id"], copy["rcpt_index"]
    api = _api(gw)
    bob = logged_in(gw, BOB)
    changes: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", f"/quarantine/{qid}/{i}/delete", {}),
        ("POST", "/quarantine/actions", {"json": {"action": "delete", "items": [[qid, i]]}}),
        ("POST", "/community", {"json": {"entry": "forged@evil.test"}}),
        ("DELETE", "/community?entry=forged@evil.test", {}),
        ("POST", "/community/import", {"json": {"csv": "forged@evil.test\n"}}),
        ("POST", "/account/password", {"json": {"current": PASSWORD, "new": "forged pass 1"}}),
        ("PUT", "/account/prefs", {"json": {"digest": False}}),
    ]
    for headers in (
        {},
        {"X-CSRF-Token": "not-the-token"},
        {"X-CSRF-Token": bob.csrf, "Origin": "http://evil.test"},
        {"X-CSRF-Token": bob.csrf, "Sec-Fetch-Site": "cross-site"},
    ):
        for method, path, kw in changes:
            r = bob.s.request(method, api + path, headers=headers, timeout=30, **kw)
            assert r.status_code == 403, (headers, method, path, r.status_code)
            assert r.json()["error"] == "forbidden"
    assert (qid, i) in {(h["queue_id"], h["rcpt_index"]) for h in held(gw, BOB)}
    assert "forged@evil.test" not in gw.kith("community", "list", BOB).stdout
    assert Web(gw).login(BOB).status_code == 303  # the password is unchanged
    # With the token in the header (as kithmail.js sends it): done.
    r = bob.s.put(
        f"{api}/account/prefs", json={"digest": False}, headers={"X-CSRF-Token": bob.csrf}
    )
    assert r.status_code == 200 and bob.get("/api/v1/account/prefs").json() == {"digest": False}
    # An API token carries no ambient authority: no CSRF token needed.
    token = _token(gw, BOB)
    r = token.post(f"{api}/quarantine/actions", json={"action": "delete", "items": [[qid, i]]})
    assert r.status_code == 200 and r.json()["done"] == 1
    assert (qid, i) not in {(h["queue_id"], h["rcpt_index"]) for h in held(gw, BOB)}


def test_admins_reach_their_tenant_s_users_and_no_further(gw: Gateway) -> None:
    ann_copy, otto_copy = hold(gw, [ANN], subject="for ann")[0], hold(gw, [OTTO])[0]
    api = _api(gw)
    tad, olga, gil = _token(gw, TAD), _token(gw, OLGA), _token(gw, GIL)

    def sees(s: requests.Session, user: str, copy: dict[str, Any]) -> bool:
        listed = s.get(f"{api}/quarantine", params={"user": user}, timeout=30)
        shown = s.get(f"{api}/quarantine/{copy['queue_id']}/{copy['rcpt_index']}", timeout=30)
        assert listed.status_code == shown.status_code, (listed.text, shown.text)
        assert listed.status_code in (200, 404)
        return listed.status_code == 200

    assert sees(tad, ANN, ann_copy) and not sees(tad, OTTO, otto_copy)
    assert sees(olga, OTTO, otto_copy) and not sees(olga, ANN, ann_copy)
    assert sees(gil, ANN, ann_copy) and sees(gil, OTTO, otto_copy)
    # A plain user is no admin of anyone.
    assert not sees(_token(gw, BOB), ANN, ann_copy)

    # The acme admin cannot act on ann's copy or write her community…
    r = olga.post(f"{api}/quarantine/{ann_copy['queue_id']}/{ann_copy['rcpt_index']}/delete")
    assert r.status_code == 404
    assert (
        olga.post(f"{api}/community?user={ANN}", json={"entry": "x@evil.test"}).status_code == 404
    )
    # …her own tenant admin can, and the entry says an admin added it.
    r = tad.post(f"{api}/community?user={ANN}", json={"entry": "partner@remote.test"})
    assert r.status_code == 200
    entries = tad.get(f"{api}/community", params={"user": ANN}).json()
    assert {"entry": "partner@remote.test", "kind": "allow", "source": "admin"} in [
        {k: e[k] for k in ("entry", "kind", "source")} for e in entries
    ]
    r = tad.post(f"{api}/quarantine/{ann_copy['queue_id']}/{ann_copy['rcpt_index']}/release")
    assert r.status_code == 200
    gw.wait_for("ann's released copy", lambda: any(b"for ann" in m for m in gw.messages(ANN)))
    audit = gw.data_dir / "kithmail.db"
    with Database.open(audit) as db:
        actors = {
            a
            for (a,) in db.read(
                "SELECT actor FROM audit_log WHERE target LIKE ?", (f"{ann_copy['queue_id']}%",)
            )
        }
    assert f"api:{TAD}" in actors
    # A global admin's change to an acme user's community is filed under acme.
    assert gil.post(f"{api}/community?user={OTTO}", json={"entry": "@vendor.test"}).ok
    with Database.open(audit) as db:
        rows = db.read(
            "SELECT tenant, target, detail FROM audit_log WHERE actor = ? AND action = ?",
            (f"api:{GIL}", "community.allow"),
        )
    assert rows == [("acme", OTTO, "entry=@vendor.test")]


def test_every_operation_wants_a_login(gw: Gateway) -> None:
    doc = requests.get(f"{_api(gw)}/openapi.json", timeout=30).json()
    base = f"http://127.0.0.1:{gw.web_port}"
    calls = 0
    for path, operations in doc["paths"].items():
        if not path.startswith("/api/v1/") or path == "/api/v1/openapi.json":
            continue
        url = re.sub(r"\{queue_id\}", "0000000000000000000", path)
        url = re.sub(r"\{rcpt_index\}", "0", url)
        url = re.sub(r"\{action\}", "release", url)
        url = re.sub(r"\{[a-z_]+\}", "1", url)
        for method in operations:
            for headers in ({}, {"Authorization": "Bearer kith_not-a-token"}):
                r = requests.request(method, base + url, headers=headers, json={}, timeout=30)
                assert r.status_code == 401, (method, url, r.status_code)
                assert r.json()["error"] == "unauthenticated"
                calls += 1
    assert calls >= 2 * 12


def test_the_password_and_prefs_by_api(gw: Gateway) -> None:
    user = "pam@example.test"
    gw.kith("user", "add", user, "--password-stdin", input=PASSWORD)
    token, browser = _token(gw, user), logged_in(gw, user)
    api = _api(gw)
    r = token.post(f"{api}/account/password", json={"current": "wrong", "new": "whatever 123"})
    assert r.status_code == 403 and r.json()["error"] == "wrong_password"
    r = token.post(f"{api}/account/password", json={"current": PASSWORD, "new": "short"})
    assert r.status_code == 400 and "8 to 1024 characters" in r.json()["detail"]
    r = token.post(f"{api}/account/password", json={"current": PASSWORD, "new": "whatever 123"})
    assert r.status_code == 200
    assert browser.get("/api/v1/me").status_code == 401  # the browser's session ended
    assert Web(gw).login(user, "whatever 123").status_code == 303
    assert token.get(f"{api}/account/prefs").json() == {"digest": True}
    assert token.put(f"{api}/account/prefs", json={"digest": False}).json() == {"digest": False}
    assert token.put(f"{api}/account/prefs", json={"digest": "maybe"}).status_code == 422
    # By session: the asking browser keeps a (fresh) session, every other one ends.
    here, there = logged_in(gw, user, "whatever 123"), logged_in(gw, user, "whatever 123")
    r = here.s.post(
        f"{api}/account/password",
        json={"current": "whatever 123", "new": "and another 1"},
        headers={"X-CSRF-Token": here.csrf},
    )
    assert r.status_code == 200 and "kith_session=" in r.headers["set-cookie"]
    assert here.get("/api/v1/me").status_code == 200
    assert there.get("/api/v1/me").status_code == 401
