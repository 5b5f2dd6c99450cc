"""A browser-like HTTP client for the web UI and its API, and held mail to look at.

`Web` keeps a cookie jar like a browser: `login()` fetches the login form
(its pre-login CSRF cookie and field), posts it, and reads the session's
CSRF token from the next page's ``<meta name="csrf-token">``, which
`post()` then sends as the form field ``csrf`` (or, with ``json=``, as the
``X-CSRF-Token`` header). Pass ``csrf=False`` to leave it off, as a forged
request would.

`hold()` sends a message from an outside address (127.0.0.2, exempt from
Recon by `WEB_SECTIONS`) that the community layer, enforcing, holds for
each local recipient, and returns the held copies as ``kith quarantine
list --json`` gives them.
"""

from __future__ import annotations

import json
import re
from typing import Any

import requests
from gateway import Gateway, message, run, send

PASSWORD = "correct horse battery staple"
# Layer 5 enforcing (a stranger's mail is held), Recon out of the way.
WEB_SECTIONS: dict[str, dict[str, Any]] = {
    "community": {"mode": "enforce"},
    "recon": {"exempt_networks": ["127.0.0.0/24"]},
}
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}

_CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]*)">')
_LOGIN_CSRF = re.compile(r'name="login_csrf" value="([^"]+)"')


class Web:
    def __init__(self, gw: Gateway) -> None:
        self.base = f"http://127.0.0.1:{gw.web_port}"
        self.s = requests.Session()
        self.csrf = ""

    def url(self, path: str) -> str:
        return self.base + path

    def get(self, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("allow_redirects", False)
        kw.setdefault("timeout", 30)
        r = self.s.get(self.url(path), **kw)
        m = _CSRF_META.search(r.text) if "text/html" in r.headers.get("content-type", "") else None
        if m and m[1]:
            self.csrf = m[1]
        return r

    def post(
        self,
        path: str,
        data: dict[str, Any] | list[tuple[str, str]] | None = None,
        *,
        json: Any = None,
        csrf: bool = True,
        headers: dict[str, str] | None = None,
        **kw: Any,
    ) -> requests.Response:
        kw.setdefault("allow_redirects", False)
        kw.setdefault("timeout", 30)
        headers = dict(headers or {})
        if json is not None:
            if csrf:
                headers["X-CSRF-Token"] = self.csrf
            return self.s.post(self.url(path), json=json, headers=headers, **kw)
        fields: list[tuple[str, str]] = (
            list(data.items()) if isinstance(data, dict) else list(data or [])
        )
        if csrf:
            fields.append(("csrf", self.csrf))
        return self.s.post(self.url(path), data=fields, headers=headers, **kw)

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("allow_redirects", False)
        kw.setdefault("timeout", 30)
        return self.s.request(method, self.url(path), **kw)

    def login(
        self, address: str, password: str = PASSWORD, *, next_: str = ""
    ) -> requests.Response:
        """Post the login form; on success (303) load the next page for its CSRF token."""
        form = self.get("/login")
        m = _LOGIN_CSRF.search(form.text)
        assert m, form.text
        r = self.post(
            "/login",
            {"address": address, "password": password, "login_csrf": m[1], "next": next_},
            csrf=False,
        )
        if r.status_code == 303:
            self.get(r.headers["location"])
        return r

    @property
    def session_cookie(self) -> str | None:
        return self.s.cookies.get("kith_session")


def logged_in(gw: Gateway, address: str, password: str = PASSWORD) -> Web:
    web = Web(gw)
    r = web.login(address, password)
    assert r.status_code == 303, r.text
    return web


def held(gw: Gateway, user: str) -> list[dict[str, Any]]:
    doc: list[dict[str, Any]] = json.loads(
        gw.kith("quarantine", "list", user, "--json", "--limit", "1000").stdout
    )
    return doc


def hold(
    gw: Gateway,
    rcpts: list[str],
    data: bytes | None = None,
    *,
    subject: str = "hello",
    sender: str = "eve@remote.test",
) -> list[dict[str, Any]]:
    """Send one message from outside; it is held for each recipient. The new held copies."""
    # ann+news@x is held for ann@x.
    users = sorted({f"{r.partition('@')[0].split('+')[0]}@{r.partition('@')[2]}" for r in rcpts})
    before = {(h["queue_id"], h["rcpt_index"]) for u in users for h in held(gw, u)}
    replies = run(
        send(gw.port, "127.0.0.2", sender, rcpts, data or message(subject=subject, sender=sender))
    )
    assert replies[-1].code == 250, [str(r) for r in replies]
    new = [h for u in users for h in held(gw, u) if (h["queue_id"], h["rcpt_index"]) not in before]
    new.sort(key=lambda h: (h["queue_id"], h["rcpt_index"]))
    assert len(new) == len(rcpts), f"{len(new)} of {len(rcpts)} held"
    return new
