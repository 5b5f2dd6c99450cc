"""Logging in to the web UI: sessions, their deaths, the login limits, API tokens, headers.

A real `kith serve` (its web listener in worker 0) and a plain HTTP client
that keeps cookies like a browser (`web_client.Web`). Users, passwords and
API tokens are changed the ways an operator would: through the web, with
`kith user …` from the shell, and with `kithmail.web.auth.create_api_token`
over the same database file.
"""

from __future__ import annotations

import http.client
import re
import ssl
import time
from collections.abc import Iterator
from http.client import HTTPResponse
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests
from gateway import Gateway, running_gateway
from web_client import PASSWORD, SECURITY_HEADERS, WEB_SECTIONS, Web, hold, logged_in

from kithmail.db import Database
from kithmail.web.auth import create_api_token, list_api_tokens, revoke_api_token

ANN, BOB = "ann@example.test", "bob@example.test"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(
        tmp_path_factory.mktemp("web-auth") / "gw",
        users=(ANN, BOB, "cat@example.test", "dan@example.test", "eve@example.test"),
        sections={
            **WEB_SECTIONS,
            "web": {"session_ttl": "2h", "idle_timeout": "30m"},
        },
    ) as g:
        yield g


def _db(gw: Gateway) -> Database:
    return Database.open(gw.data_dir / "kithmail.db")


def _alive(web: Web) -> bool:
    """Does this client's session still open the API? (200, else 401)."""
    r = web.get("/api/v1/me")
    assert r.status_code in (200, 401), r.text
    return r.status_code == 200


def test_login_sets_a_safe_cookie_and_a_new_session_id(gw: Gateway) -> None:
    web = Web(gw)
    # Not logged in: a page sends you to /login, the API says 401 as JSON.
    r = web.get("/quarantine?sender=x")
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=%2Fquarantine%3Fsender%3Dx"
    r = web.get("/api/v1/me")
    assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
    assert r.headers["www-authenticate"] == "Bearer"

    # A cookie planted before login (session fixation) is not the session after it.
    web.s.cookies.set("kith_session", "planted-by-an-attacker", domain="127.0.0.1", path="/")
    r = web.login(ANN, next_="/community")
    assert r.status_code == 303 and r.headers["location"] == "/community"
    cookie = r.headers["set-cookie"]
    assert "kith_session=" in cookie and "planted" not in cookie
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
    assert {"httponly", "path"} <= attrs and "secure" not in attrs  # plain HTTP here
    assert re.search(r"samesite=lax", cookie, re.I) and "Path=/" in cookie
    me = web.get("/api/v1/me").json()
    assert me == {"address": ANN, "tenant": "default", "role": "user", "via": "session"}

    # A second login gets another session id; the first one ended with it.
    first = web.session_cookie
    assert first is not None
    again = web.login(ANN)
    assert again.status_code == 303 and web.session_cookie != first
    stale = Web(gw)
    stale.s.cookies.set("kith_session", first, domain="127.0.0.1", path="/")
    assert not _alive(stale)
    assert _alive(web)


def test_login_redirects_only_to_our_own_pages(gw: Gateway) -> None:
    for target in ("//evil.test/x", "https://evil.test/", "/\\evil.test", "javascript:alert(1)"):
        r = Web(gw).login(BOB, next_=target)
        assert r.status_code == 303 and r.headers["location"] == "/quarantine", target


def test_a_wrong_password_and_an_unknown_user_get_the_same_answer(gw: Gateway) -> None:
    wrong = Web(gw).login("cat@example.test", "not the password")
    unknown = Web(gw).login("nobody@example.test", "not the password")
    assert wrong.status_code == unknown.status_code == 401
    assert "kith_session" not in wrong.headers.get("set-cookie", "")

    def page(r: requests.Response) -> str:
        text = re.sub(r'value="[^"]*@example\.test"', "", r.text)  # the address typed, echoed
        return re.sub(r'name="login_csrf" value="[^"]+"', "", text)

    assert page(wrong) == page(unknown)
    assert "Wrong mail address or password." in wrong.text


def test_the_login_form_needs_its_own_token_and_origin(gw: Gateway) -> None:
    web = Web(gw)
    r = web.post("/login", {"address": ANN, "password": PASSWORD}, csrf=False)
    assert r.status_code == 403 and "kith_session" not in r.headers.get("set-cookie", "")
    # A page on another site posting a login (login CSRF) is refused even with a token.
    form = web.get("/login")
    token = re.search(r'name="login_csrf" value="([^"]+)"', form.text)
    assert token
    r = web.post(
        "/login",
        {"address": ANN, "password": PASSWORD, "login_csrf": token[1]},
        csrf=False,
        headers={"Origin": "http://evil.test"},
    )
    assert r.status_code == 403 and "kith_session" not in r.headers.get("set-cookie", "")


def test_logout_ends_the_session_on_the_server(gw: Gateway) -> None:
    web = logged_in(gw, BOB)
    cookie = web.session_cookie
    assert cookie is not None
    # Logging out is a change: without the CSRF token it is refused.
    assert web.post("/logout", csrf=False).status_code == 403
    assert _alive(web)
    r = web.post("/logout")
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    # The cookie replayed (a copy an attacker kept) opens nothing.
    replay = Web(gw)
    replay.s.cookies.set("kith_session", cookie, domain="127.0.0.1", path="/")
    assert not _alive(replay)
    assert replay.get("/quarantine").status_code == 303


def test_a_password_change_ends_every_other_session(gw: Gateway) -> None:
    user = "dan@example.test"
    here, there = logged_in(gw, user), logged_in(gw, user)
    r = here.post(
        "/account/password",
        {"current": "wrong", "new": "a new password 1", "confirm": "a new password 1"},
    )
    assert r.status_code == 403 and "current password is not right" in r.text
    assert _alive(there)
    r = here.post(
        "/account/password",
        {"current": PASSWORD, "new": "a new password 1", "confirm": "a new password 1"},
    )
    assert r.status_code == 303, r.text
    here.get(r.headers["location"])
    assert _alive(here)  # this browser got a fresh session
    assert not _alive(there)
    assert Web(gw).login(user).status_code == 401
    assert Web(gw).login(user, "a new password 1").status_code == 303

    # From the shell too, even within the same second as the login.
    web = logged_in(gw, user, "a new password 1")
    gw.kith("user", "passwd", user, "--password-stdin", input=PASSWORD + "\n")
    assert not _alive(web)


def test_disabling_or_removing_a_user_ends_their_sessions(gw: Gateway) -> None:
    user = "eve@example.test"
    web = logged_in(gw, user)
    gw.kith("user", "disable", user)
    assert not _alive(web)
    assert Web(gw).login(user).status_code == 401
    gw.kith("user", "enable", user)
    # Enabling again does not bring the old session back.
    assert not _alive(web)
    web = logged_in(gw, user)
    gw.kith("user", "remove", user)
    assert not _alive(web)


def test_sessions_expire_when_idle_and_at_their_age(gw: Gateway) -> None:
    idle, busy = logged_in(gw, "cat@example.test"), logged_in(gw, "cat@example.test")
    gw.advance(20 * 60)
    assert _alive(busy)
    gw.advance(20 * 60)  # 40 minutes idle: over the 30-minute limit
    assert not _alive(idle)
    assert _alive(busy)  # used 20 minutes ago
    for _ in range(4):
        gw.advance(25 * 60)
        if not _alive(busy):
            break
    # Kept busy, it still ends at its two-hour age.
    assert not _alive(busy)
    assert gw.offset >= 2 * 3600 - 40 * 60


def test_api_tokens_need_no_csrf_and_die_with_their_user(gw: Gateway) -> None:
    with _db(gw) as db:
        ann = db.user(ANN)
        secret = create_api_token(db, ann.id, "provisioning script", ttl_s=None)
        (listed,) = [t for t in list_api_tokens(db, ann.id) if t.name == "provisioning script"]
    assert secret.startswith("kith_") and secret not in repr(listed)
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {secret}"
    base = f"http://127.0.0.1:{gw.web_port}/api/v1"
    me = api.get(f"{base}/me", timeout=10).json()
    assert me["address"] == ANN and me["via"] == "token"
    # A change with the token and no CSRF token is fine: nothing ambient to forge.
    r = api.post(f"{base}/community", json={"entry": "friend@remote.test"}, timeout=10)
    assert r.status_code == 200, r.text
    (copy,) = hold(gw, [ANN], subject="by token")
    r = api.post(f"{base}/quarantine/{copy['queue_id']}/{copy['rcpt_index']}/release", timeout=10)
    assert r.status_code == 200 and r.json()["ok"] is True
    gw.wait_for("the released copy", lambda: gw.messages(ANN))

    # A wrong token, another scheme, or a session cookie beside a bad token: 401.
    for header in (f"Bearer {secret}x", "Bearer ", f"Basic {secret}", "Bearer kith_"):
        r = requests.get(f"{base}/me", headers={"Authorization": header}, timeout=10)
        assert r.status_code == 401, header
    web = logged_in(gw, BOB)
    r = web.get("/api/v1/me", headers={"Authorization": "Bearer kith_nope"})
    assert r.status_code == 401

    with _db(gw) as db:
        revoke_api_token(db, listed.id)
    assert api.get(f"{base}/me", timeout=10).status_code == 401
    cat = "cat@example.test"
    with _db(gw) as db:
        # The server's clock runs ahead of this process's (earlier tests moved it).
        short = create_api_token(
            db, db.user(cat).id, "short", ttl_s=60, now=int(time.time() + gw.offset)
        )
        lasting = create_api_token(db, db.user(cat).id, "lasting", ttl_s=None)
    for secret_, alive in ((short, True), (lasting, True)):
        api.headers["Authorization"] = f"Bearer {secret_}"
        assert (api.get(f"{base}/me", timeout=10).status_code == 200) is alive
    gw.advance(61)
    api.headers["Authorization"] = f"Bearer {short}"
    assert api.get(f"{base}/me", timeout=10).status_code == 401
    api.headers["Authorization"] = f"Bearer {lasting}"
    assert api.get(f"{base}/me", timeout=10).status_code == 200
    gw.kith("user", "disable", cat)
    assert api.get(f"{base}/me", timeout=10).status_code == 401
    gw.kith("user", "enable", cat)


def test_every_answer_carries_the_security_headers(gw: Gateway) -> None:
    web = logged_in(gw, BOB)
    (copy,) = hold(gw, [BOB], subject="headers")
    anon = Web(gw)
    answers = {
        "login page": anon.get("/login"),
        "redirect": anon.get("/quarantine"),
        "api 401": anon.get("/api/v1/me"),
        "openapi": anon.get("/api/v1/openapi.json"),
        "static": anon.get("/static/kithmail.css"),
        "404 page": anon.get("/no/such/page"),
        "quarantine": web.get("/quarantine"),
        "message": web.get(f"/quarantine/{copy['queue_id']}/{copy['rcpt_index']}"),
        "community": web.get("/community"),
        "account": web.get("/account"),
        "api": web.get("/api/v1/quarantine"),
        "api 404": web.get("/api/v1/quarantine/0000000000000000000/0"),
        "api 405": web.request("PATCH", "/api/v1/me"),
        "api 422": web.get("/api/v1/quarantine?limit=0"),
        "export": web.get("/community/export.csv"),
        "403": web.post("/community/add", {"entry": "x@y.test"}, csrf=False),
    }
    for name, r in answers.items():
        for header, value in SECURITY_HEADERS.items():
            assert r.headers.get(header) == value, (name, header, r.headers.get(header))
    for name in ("quarantine", "message", "community", "account", "api", "export", "login page"):
        assert answers[name].headers["cache-control"] == "no-store", name
    assert answers["api 404"].json() == {"error": "not_found", "detail": "no such held message"}
    assert answers["api 405"].status_code == 405
    assert answers["api 422"].json()["error"] == "invalid"


def test_failed_logins_are_limited_per_account_and_per_ip(tmp_path: Path) -> None:
    with running_gateway(
        tmp_path / "gw",
        users=(ANN, BOB, "cat@example.test"),
        sections={
            "web": {
                "login_failures_per_account": 3,
                "login_failures_per_ip": 5,
                "login_window": "10m",
            }
        },
    ) as gw:
        # One account, however it is spelt.
        for spelling in (ANN, "ANN@Example.TEST", " ann@EXAMPLE.test "):
            assert Web(gw).login(spelling, "guess").status_code == 401
        # The account is locked now, even for the right password…
        r = Web(gw).login(ANN)
        assert r.status_code == 429 and "Too many failed logins" in r.text
        assert int(r.headers["retry-after"]) > 0
        # …but not another account, from the same address, while under the IP's limit.
        assert Web(gw).login(BOB).status_code == 303
        # Failures spread over accounts count against the IP.
        assert Web(gw).login(BOB, "guess").status_code == 401
        assert Web(gw).login("nobody@example.test", "guess").status_code == 401
        r = Web(gw).login("cat@example.test")
        assert r.status_code == 429
        # When the window has passed, logins work again.
        gw.advance(10 * 60 + 1)
        assert Web(gw).login(ANN).status_code == 303
        assert Web(gw).login("cat@example.test").status_code == 303


def test_over_tls_the_cookies_are_secure(tmp_path: Path) -> None:
    with running_gateway(tmp_path / "gw", users=(ANN,), sections={"web": {"tls": True}}) as gw:
        # The gateway's own self-signed certificate (it names mx.kithmail.test).
        ctx = ssl.create_default_context(cafile=str(gw.data_dir / "tls" / "cert.pem"))
        ctx.check_hostname = False

        def call(method: str, path: str, body: str = "", cookie: str = "") -> HTTPResponse:
            conn = http.client.HTTPSConnection("127.0.0.1", gw.web_port, context=ctx, timeout=10)
            headers = {"Cookie": cookie} if cookie else {}
            if body:
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            conn.request(method, path, body=body or None, headers=headers)
            r = conn.getresponse()
            r.read()
            conn.close()
            return r

        form = call("GET", "/login")
        pre = form.getheader("set-cookie") or ""
        assert pre.startswith("kith_login=") and "Secure" in pre and "HttpOnly" in pre
        token = pre.split(";", 1)[0].split("=", 1)[1]
        body = urlencode({"address": ANN, "password": PASSWORD, "login_csrf": token})
        r = call("POST", "/login", body, cookie=f"kith_login={token}")
        assert r.status == 303
        cookies = r.headers.get_all("set-cookie") or []
        (session,) = [c for c in cookies if c.startswith("kith_session=")]
        assert "Secure" in session and "HttpOnly" in session and "SameSite=lax" in session
        me = call("GET", "/api/v1/me", cookie=session.split(";", 1)[0])
        assert me.status == 200
        # Plain HTTP on the same port is not answered as a page.
        with pytest.raises((requests.ConnectionError, requests.exceptions.SSLError)):
            requests.get(f"http://127.0.0.1:{gw.web_port}/login", timeout=5)


def test_the_first_admin_logs_in_with_the_same_form(gw: Gateway) -> None:
    m = re.search(
        r"created the admin account (admin@example\.test) with password (\S+) ", gw.log_text()
    )
    assert m, "the first start prints the admin's password once"
    admin = Web(gw)
    assert admin.login(m[1], m[2]).status_code == 303
    me = admin.get("/api/v1/me").json()
    assert (me["address"], me["role"]) == ("admin@example.test", "global_admin")
    page = admin.get("/quarantine").text
    # Admins see the admin pages in the navigation; users do not.
    assert 'href="/admin/' in page
    assert 'href="/admin/' not in logged_in(gw, BOB).get("/quarantine").text


def test_behind_an_https_proxy_cookies_are_secure_and_the_origin_is_https(
    tmp_path: Path,
) -> None:
    with running_gateway(
        tmp_path / "gw", users=(ANN,), sections={"web": {"https_proxy": True}}
    ) as gw:
        # What the proxy forwards: plain HTTP, the browser's Host, its https Origin.
        base = f"http://127.0.0.1:{gw.web_port}"
        origin = {"Origin": f"https://127.0.0.1:{gw.web_port}"}
        form = requests.get(f"{base}/login", timeout=10)
        pre = form.headers["set-cookie"]
        assert "Secure" in pre
        token = pre.split(";", 1)[0].split("=", 1)[1]
        r = requests.post(
            f"{base}/login",
            data={"address": ANN, "password": PASSWORD, "login_csrf": token},
            headers={**origin, "Cookie": f"kith_login={token}"},
            allow_redirects=False,
            timeout=10,
        )
        assert r.status_code == 303
        session = r.headers["set-cookie"]
        assert session.startswith("kith_session=") and "Secure" in session
        cookie = {"Cookie": session.split(";", 1)[0]}
        page = requests.get(f"{base}/account", headers=cookie, timeout=10).text
        m = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
        assert m
        digest_off = {"csrf": m[1], "digest": "off"}
        # The plain-HTTP origin is not the browser's: refused.
        plain_origin = {"Origin": base}
        r = requests.post(
            f"{base}/account/digest",
            data=digest_off,
            headers={**cookie, **plain_origin},
            allow_redirects=False,
            timeout=10,
        )
        assert r.status_code == 403
        r = requests.post(
            f"{base}/account/digest",
            data=digest_off,
            headers={**cookie, **origin},
            allow_redirects=False,
            timeout=10,
        )
        assert r.status_code == 303
