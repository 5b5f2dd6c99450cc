"""The SAV confirmation page, served by uvicorn on loopback and spoken to over real HTTP.

The app runs with `serve_public` in a thread of its own (its own event
loop), on a socket bound and listening before the thread starts, so the
first request waits in the backlog rather than on a sleep. The client is
urllib. Every assertion is on what a browser or a scanner would get: the
status, the headers, the HTML, and the side effects (the challenge row,
the on_verified calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

import pytest
from test_sav import HELD, SENDER, USER, Env, make_env, send_one

from kithmail.public import SECURITY_HEADERS, bind, make_app, serve_public

ORIGIN = "https://mail.example.test"
HOSTILE_SUBJECT = '<script>alert("x")</script> & <b>bold</b> =?utf-8?q?=3Cimg_src=3Dx=3E?='


@dataclass
class Page:
    env: Env
    port: int
    calls: list[tuple[str, str, str]] = field(default_factory=list)

    def request(
        self,
        method: str,
        path: str,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Message, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method, headers=headers or {}
        )
        if data is not None:
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.headers, r.read().decode()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.headers, e.read().decode()

    def state(self) -> list[object]:
        return [r[0] for r in self.env.db.read("SELECT state FROM challenges ORDER BY id")]


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    env = make_env(tmp_path)
    calls: list[tuple[str, str, str]] = []

    async def on_verified(tenant: str, user: str, sender: str) -> None:
        calls.append((tenant, user, sender))

    app = make_app(env.settings, env.db, on_verified, sav=env.sav)
    socks = bind(["127.0.0.1:0"])
    port = socks[0].getsockname()[1]
    loop_ready = threading.Event()
    holder: dict[str, object] = {}

    async def main() -> None:
        holder["loop"] = asyncio.get_running_loop()
        task = asyncio.ensure_future(serve_public(app, [], sockets=socks))
        holder["task"] = task
        loop_ready.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert loop_ready.wait(10)
    try:
        yield Page(env, port, calls)
    finally:
        loop = holder["loop"]
        task = holder["task"]
        assert isinstance(loop, asyncio.AbstractEventLoop) and isinstance(task, asyncio.Future)
        loop.call_soon_threadsafe(task.cancel)
        thread.join(10)
        assert not thread.is_alive()
        env.db.close()


def index_subject(env: Env, subject: str) -> None:
    """The quarantine index row of the held message, as the quarantine module writes it."""
    with env.db.write() as conn:
        conn.execute(
            "INSERT INTO quarantine (queue_id, rcpt_index, tenant, user, sender, subject, size,"
            " layer, reason, held_at, expires_at) VALUES (?, 0, 'default', ?, ?, ?, 100,"
            " 'community', 'community.unknown', 0, 0)",
            (HELD, USER, SENDER, subject),
        )


def form_tag(body: str) -> str:
    m = re.search(r'name="form" value="([0-9a-f]+)"', body)
    assert m, body
    return m[1]


def test_get_shows_sender_and_subject_escaped_and_changes_nothing(page: Page) -> None:
    _, token = send_one(page.env)
    index_subject(page.env, HOSTILE_SUBJECT)
    for _ in range(2):  # a scanner and a preview: still nothing
        status, headers, body = page.request("GET", f"/sav/{token}")
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
    assert SENDER in body and USER in body
    assert "<script>" not in body and "<b>bold</b>" not in body and "<img" not in body
    assert html.escape('<script>alert("x")</script> & <b>bold</b>') in body
    assert body.count("<button") == 1 and body.count("<form") == 1
    assert f'action="{ORIGIN}/sav/{token}"' in body
    assert page.state() == ["sent"] and page.calls == []


def test_post_confirms_once_and_a_replay_is_refused(page: Page) -> None:
    _, token = send_one(page.env)
    _, _, body = page.request("GET", f"/sav/{token}")
    form = {"form": form_tag(body)}
    status, _, body = page.request("POST", f"/sav/{token}", form, {"Origin": ORIGIN})
    assert status == 200 and "Confirmed" in body
    assert page.calls == [("default", USER, SENDER)]
    assert page.state() == ["verified"]
    status, _, body = page.request("POST", f"/sav/{token}", form, {"Origin": ORIGIN})
    assert status == 410 and "Already confirmed" in body
    status, _, _ = page.request("GET", f"/sav/{token}")
    assert status == 410
    assert page.calls == [("default", USER, SENDER)]
    audit = page.env.db.read("SELECT action, detail FROM audit_log")
    assert audit == [("sav.verified", f"via page; held {HELD}")]


def test_post_without_origin_or_referer_is_accepted_with_the_form_tag(page: Page) -> None:
    """Non-browser clients send neither; the token and the tag are the capability."""
    _, token = send_one(page.env)
    tag = form_tag(page.request("GET", f"/sav/{token}")[2])
    status, _, _ = page.request("POST", f"/sav/{token}", {"form": tag})
    assert status == 200 and page.state() == ["verified"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Origin": "https://evil.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Origin": "http://mail.example.test"}, 403),  # another scheme is another origin
        ({"Referer": "https://evil.example/page"}, 403),
        ({"Origin": ORIGIN, "Sec-Fetch-Site": "cross-site"}, 403),
    ],
)
def test_cross_site_posts_are_refused(page: Page, headers: dict[str, str], status: int) -> None:
    _, token = send_one(page.env)
    tag = form_tag(page.request("GET", f"/sav/{token}")[2])
    got, _, _ = page.request("POST", f"/sav/{token}", {"form": tag}, headers)
    assert got == status
    assert page.state() == ["sent"] and page.calls == []


def test_a_blind_post_without_the_pages_form_tag_is_refused(page: Page) -> None:
    _, token = send_one(page.env)
    for form in ({}, {"form": "0" * 32}):
        status, _, _ = page.request("POST", f"/sav/{token}", form, {"Origin": ORIGIN})
        assert status == 400
    status, _, _ = page.request(
        "POST", f"/sav/{token}", None, {"Origin": ORIGIN, "Content-Type": "text/plain"}
    )
    assert status == 400
    assert page.state() == ["sent"] and page.calls == []


def test_bad_tokens_get_a_polite_404(page: Page) -> None:
    _, token = send_one(page.env)
    flipped = token[:-1] + ("a" if token[-1] != "a" else "b")
    for path in (f"/sav/{flipped}", "/sav/nonsense", "/sav/" + "a" * 48, "/", "/sav/"):
        status, headers, body = page.request("GET", path)
        assert status == 404, path
        assert "Link not found" in body or "not valid" in body
        assert headers["Content-Type"].startswith("text/html")
    status, _, _ = page.request("POST", f"/sav/{flipped}", {"form": "x"}, {"Origin": ORIGIN})
    assert status == 404
    assert page.state() == ["sent"]


def test_an_expired_token_gets_410(page: Page) -> None:
    _, token = send_one(page.env)
    tag = form_tag(page.request("GET", f"/sav/{token}")[2])
    page.env.clock.now += page.env.settings.community.token_ttl
    status, _, body = page.request("GET", f"/sav/{token}")
    assert status == 410 and "expired" in body
    status, _, _ = page.request("POST", f"/sav/{token}", {"form": tag}, {"Origin": ORIGIN})
    assert status == 410
    assert page.state() == ["sent"] and page.calls == []


def test_security_headers_on_every_answer(page: Page) -> None:
    _, token = send_one(page.env)
    answers = [
        page.request("GET", f"/sav/{token}"),
        page.request("GET", "/sav/nonsense"),
        page.request("PUT", f"/sav/{token}"),
        page.request("POST", f"/sav/{token}", {"form": "x"}, {"Origin": "https://evil.example"}),
    ]
    assert [a[0] for a in answers] == [200, 404, 405, 403]
    for _, headers, body in answers:
        for name, value in SECURITY_HEADERS:
            assert headers[name.decode()] == value.decode()
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "server" not in {k.lower() for k in headers}
        # No external resource of any kind: no src=, no link to another site.
        assert "src=" not in body and "<link" not in body and "<script" not in body
