"""The user's pages against a real `kith serve`: isolation, CSRF, hostile mail, search, community.

Held mail is made the real way: an outside server (127.0.0.2, exempt from
Recon) sends mail that the community layer, enforcing, holds. Every check
is on what the server answers and what it then did (the quarantine as
``kith quarantine list`` shows it, the Maildir, the community as ``kith
community list`` shows it).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator

import pytest
from gateway import Gateway, message, run, running_gateway
from hostile import RLO, RLO_SENDER, broken, plain, rich, send_rlo_sender
from web_client import SECURITY_HEADERS, WEB_SECTIONS, held, hold, logged_in

from kithmail.db import Database

ANN, BOB, CAT, DAN, FAY = (f"{n}@example.test" for n in ("ann", "bob", "cat", "dan", "fay"))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(
        tmp_path_factory.mktemp("web-user") / "gw",
        users=(ANN, BOB, CAT, DAN, FAY),
        sections={**WEB_SECTIONS, "web": {"max_upload": "4KiB"}},
    ) as g:
        yield g


def _ids(page: str) -> list[str]:
    return re.findall(r'name="id" value="([^"]+)"', page)


def test_a_user_sees_and_acts_on_only_their_own_mail(gw: Gateway) -> None:
    ann_copy, bob_copy = hold(gw, [ANN, BOB], subject="for two")
    qid = ann_copy["queue_id"]
    assert bob_copy["queue_id"] == qid and (ann_copy["rcpt_index"], bob_copy["rcpt_index"]) == (
        0,
        1,
    )
    ann = logged_in(gw, ANN)
    page = ann.get("/quarantine").text
    assert _ids(page) == [f"{qid}:0"]

    # Bob's copy, by URL: the same 404 as a message that does not exist.
    for path in (f"/quarantine/{qid}/1", f"/quarantine/{qid}/1/html", f"/quarantine/{qid}/7"):
        r = ann.get(path)
        assert r.status_code == 404 and "for two" not in r.text, path
    missing = ann.get("/quarantine/0000000000000000000/0")
    assert missing.status_code == 404
    assert ann.get(f"/quarantine/{qid}/1").text == missing.text

    # Bob's copy, by a forged form (alone and among her own): not touched.
    for action in ("release", "allow_release", "block", "delete"):
        r = ann.post("/quarantine/act", [("action", action), ("id", f"{qid}:1")])
        assert r.status_code == 303 and "failed=1" in r.headers["location"], action
        assert "why=not_found" in r.headers["location"]
    assert [h["rcpt_index"] for h in held(gw, BOB)] == [1]
    # Ids that are not ids at all are refused the same way, never a 500.
    for bad in ("../../etc/passwd:0", f"{qid}:-1", f"{qid}:99999999", f"{qid}", "x" * 500):
        r = ann.post("/quarantine/act", [("action", "delete"), ("id", bad)])
        assert r.status_code == 303 and "failed=1" in r.headers["location"], bad
    assert len(held(gw, ANN)) == 1 and len(held(gw, BOB)) == 1

    r = ann.post("/quarantine/act", [("action", "release"), ("id", f"{qid}:0"), ("id", f"{qid}:1")])
    assert r.status_code == 303
    assert "done=release" in r.headers["location"] and "n=1" in r.headers["location"]
    assert "failed=1" in r.headers["location"]
    gw.wait_for("ann's copy", lambda: gw.messages(ANN))
    assert held(gw, ANN) == [] and len(held(gw, BOB)) == 1 and gw.messages(BOB) == []
    shown = ann.get(r.headers["location"]).text
    assert "Released 1 message" in shown and "1 could not be done" in shown


def test_every_change_needs_the_csrf_token_and_our_origin(gw: Gateway) -> None:
    (copy,) = hold(gw, [CAT], subject="csrf")
    cid = f"{copy['queue_id']}:{copy['rcpt_index']}"
    cat = logged_in(gw, CAT)
    own = cat.base
    forged: list[tuple[str, dict[str, str], bool]] = [
        ("no token", {}, False),
        ("wrong token", {}, False),
        ("other origin", {"Origin": "http://evil.test"}, True),
        ("null origin", {"Origin": "null"}, True),
        ("other port", {"Origin": "http://127.0.0.1:1"}, True),
        ("other referer", {"Referer": "http://evil.test/page"}, True),
        ("cross-site fetch", {"Sec-Fetch-Site": "cross-site"}, True),
    ]
    for name, headers, with_token in forged:
        fields = [("action", "delete"), ("id", cid)]
        if name == "wrong token":
            fields.append(("csrf", "x" * 43))
        for path, data in (
            ("/quarantine/act", fields),
            ("/community/add", [("entry", "forged@evil.test"), ("kind", "allow")]),
            ("/account/digest", [("digest", "off")]),
            ("/logout", []),
        ):
            r = cat.post(path, data, csrf=with_token, headers=headers)
            assert r.status_code == 403, (name, path, r.status_code)
            assert (
                SECURITY_HEADERS["content-security-policy"] == r.headers["content-security-policy"]
            )
    assert len(held(gw, CAT)) == 1
    assert "forged@evil.test" not in gw.kith("community", "list", CAT).stdout
    # The real page, same origin: done.
    r = cat.post("/quarantine/act", [("action", "delete"), ("id", cid)], headers={"Origin": own})
    assert r.status_code == 303 and "done=delete" in r.headers["location"]
    assert held(gw, CAT) == []


def test_hostile_messages_are_only_ever_text(gw: Gateway) -> None:
    hold(gw, [DAN], plain(rcpt=DAN))
    (rich_copy,) = hold(gw, [DAN], rich(rcpt=DAN))
    assert run(send_rlo_sender(gw.port, DAN)) == 250
    (rlo_copy,) = [h for h in held(gw, DAN) if h["sender"] == RLO_SENDER]
    dan = logged_in(gw, DAN)
    listing = dan.get("/quarantine").text
    # An override in the envelope sender: shown, never obeyed, on the list and the message.
    assert "gpj.exe[U+202E]ann@remote.test" in listing
    rlo_page = dan.get(f"/quarantine/{rlo_copy['queue_id']}/{rlo_copy['rcpt_index']}").text
    assert "gpj.exe[U+202E]ann@remote.test" in rlo_page and RLO not in rlo_page
    # The subjects are there, as text: escaped, decoded, the override made visible.
    assert "&lt;script&gt;alert(&#39;subject&#39;)&lt;/script&gt;" in listing
    assert "&lt;script&gt;alert(&#39;encoded&#39;)&lt;/script&gt;" in listing
    path = f"/quarantine/{rich_copy['queue_id']}/{rich_copy['rcpt_index']}"
    text_view = dan.get(path)
    html_view = dan.get(path + "?view=html")
    frame = dan.get(path + "/html")
    for name, page in (("list", listing), ("text", text_view.text), ("html", html_view.text)):
        assert "<script>alert" not in page, name
        assert "javascript:" not in re.sub(r"&[^;]+;", "", page).split("<pre")[0], name
        assert 'href="javascript' not in page.lower() and "onload=" not in page, name
        assert RLO not in page, name
        # Only our own script, from our own origin.
        assert re.findall(r"<script[^>]*>", page) == ['<script src="/static/kithmail.js" defer>'], (
            name
        )
    body = text_view.text
    assert "invoice[U+202E]gpj.exe" in body  # the attachment, by name
    assert "&lt;a href=&#34;javascript:alert(&#39;text-link&#39;)&#34;&gt;" in body or (
        "&lt;a href=&quot;javascript:alert(&#39;text-link&#39;)&quot;&gt;" in body
    )
    assert "Show the HTML version" in body
    assert (
        text_view.headers["content-security-policy"] == SECURITY_HEADERS["content-security-policy"]
    )

    # The HTML view: a sandboxed frame (no allow-* at all), allowed by frame-src 'self' only here.
    assert re.search(r'<iframe class="html-part" src="[^"]+/html" sandbox ', html_view.text)
    assert html_view.headers["content-security-policy"].endswith("; frame-src 'self'")
    # The frame's document: sandboxed by its own CSP too, nothing loaded, no refresh.
    csp = frame.headers["content-security-policy"]
    assert csp.startswith("sandbox;") and "default-src 'none'" in csp and "script-src" not in csp
    assert "img-src data:" in csp and frame.headers["x-frame-options"] == "SAMEORIGIN"
    assert frame.headers["x-content-type-options"] == "nosniff"
    assert "<meta" not in frame.text.lower() and "<x-meta" in frame.text.lower()

    # Broken MIME is shown as well as it can be, never a server error.
    (broken_copy,) = hold(gw, [DAN], broken(rcpt=DAN))
    path = f"/quarantine/{broken_copy['queue_id']}/{broken_copy['rcpt_index']}"
    for view, status in (("", 200), ("?view=html", 200), ("/html", 404)):
        assert dan.get(path + view).status_code == status, view
    assert dan.get(f"/api/v1{path}").status_code == 200
    assert "application/pdf" in dan.get(path).text

    # The API gives the same text as JSON data, never as HTML.
    r = dan.get("/api/v1/quarantine")
    assert r.headers["content-type"] == "application/json"
    subjects = {i["subject"] for i in r.json()["items"]}
    assert "<script>alert('subject')</script>" in subjects


def test_search_by_sender_subject_and_date_and_page(gw: Gateway) -> None:
    hold(
        gw,
        [FAY],
        message(subject="Your invoice", sender="billing@shop.test"),
        sender="billing@shop.test",
    )
    # One message to 51 sub-addresses of one user: 51 held copies, one transaction.
    rcpts = [f"fay+{i}@example.test" for i in range(51)]
    hold(gw, rcpts, message(subject="bulk offer"))
    gw.advance(3 * 86400)
    hold(gw, [FAY], message(subject="three days later"))
    fay = logged_in(gw, FAY)

    first = fay.get("/quarantine").text
    assert "53 held messages" in first and len(_ids(first)) == 50
    assert first.index("three days later") < first.index("bulk offer")  # newest first
    assert "Page 1 of 2" in first and "Older →" in first
    second = fay.get("/quarantine?page=2").text
    assert len(_ids(second)) == 3 and set(_ids(first)).isdisjoint(_ids(second))

    r = fay.get("/quarantine?sender=SHOP.test").text
    assert "1 held message match" in r and "Your invoice" in r
    r = fay.get("/quarantine?subject=offer&page=2").text
    assert "51 held messages match" in r and len(_ids(r)) == 1

    days = sorted({h["held_at"][:10] for h in held(gw, FAY)})
    assert len(days) == 2
    r = fay.get(f"/quarantine?since={days[1]}").text
    assert "1 held message match" in r and "three days later" in r
    r = fay.get(f"/quarantine?until={days[0]}&subject=invoice").text
    assert "1 held message match" in r
    r = fay.get("/quarantine?since=yesterday")
    assert r.status_code == 200 and "Dates are written YYYY-MM-DD." in r.text
    day = datetime.date.fromisoformat(days[1]) + datetime.timedelta(days=1)
    assert "Nothing held matches" in fay.get(f"/quarantine?since={day}").text
    # Bulk: the whole second page released at once.
    r = fay.post("/quarantine/act", [("action", "delete")] + [("id", i) for i in _ids(second)])
    assert "done=delete" in r.headers["location"] and "n=3" in r.headers["location"]
    assert len(held(gw, FAY)) == 50


def test_the_community_page_adds_removes_imports_and_exports(gw: Gateway) -> None:
    bob = logged_in(gw, BOB)
    r = bob.post("/community/add", {"entry": "Friend@Remote.TEST", "kind": "allow"})
    assert r.status_code == 303
    assert "Added friend@remote.test." in bob.get(r.headers["location"]).text
    assert bob.post("/community/add", {"entry": "@spam.test", "kind": "block"}).status_code == 303
    page = bob.get("/community").text
    allowed, blocked = page.split("Blocked", 1)
    assert "friend@remote.test" in allowed and "@spam.test" in blocked
    assert "manual" in page
    r = bob.post("/community/add", {"entry": "not an address", "kind": "allow"})
    assert r.status_code == 400 and "Not an address" in r.text

    # Others' entries are not shown, and cannot be removed by naming them.
    ann = logged_in(gw, ANN)
    assert "friend@remote.test" not in ann.get("/community").text
    r = ann.post("/community/remove", {"entry": "friend@remote.test"})
    assert r.status_code == 404
    assert "friend@remote.test" in gw.kith("community", "list", BOB).stdout

    # Import: all or nothing, each bad line named.
    bad = "entry,kind\r\none@ok.test\r\nnot valid\r\n@fine.test\r\nalso bad\r\n"
    r = bob.post("/community/import", {"kind": "allow"}, files={"file": ("c.csv", bad)})
    assert r.status_code == 400
    assert "Line 3:" in r.text and "Line 5:" in r.text and "Nothing was imported." in r.text
    assert "one@ok.test" not in gw.kith("community", "list", BOB).stdout
    good = "\ufeffentry\r\none@ok.test\r\n@fine.test\r\n'=cmd@x.test\r\n"
    r = bob.post("/community/import", {"kind": "block"}, files={"file": ("c.csv", good)})
    assert r.status_code == 303
    assert "Imported 3 entries: 3 new or changed" in bob.get(r.headers["location"]).text
    big = "x@y.test\r\n" * 500  # 5 000 bytes, over the 4 KiB limit
    r = bob.post("/community/import", {"kind": "allow"}, files={"file": ("c.csv", big)})
    assert r.status_code == 413 and "larger than 4096 bytes" in r.text

    export = bob.get("/community/export.csv")
    assert export.headers["content-type"].startswith("text/csv")
    rows = export.text.splitlines()
    assert rows[0] == "entry,kind,source,added"
    assert any(r.startswith("'=cmd@x.test,block,import,") for r in rows)
    assert any(r.startswith("@spam.test,block,manual,") for r in rows)

    r = bob.post("/community/remove", {"entry": "@spam.test"})
    assert r.status_code == 303
    assert "@spam.test" not in gw.kith("community", "list", BOB).stdout


def test_the_digest_can_be_turned_off_and_on(gw: Gateway) -> None:
    cat = logged_in(gw, CAT)
    assert "You get a daily mail" in cat.get("/account").text
    r = cat.post("/account/digest", {"digest": "off"})
    assert r.status_code == 303
    assert "no longer get the daily digest" in cat.get(r.headers["location"]).text
    with Database.open(gw.data_dir / "kithmail.db") as db:
        uid = db.user(CAT).id
        assert db.read("SELECT digest FROM user_prefs WHERE user_id = ?", (uid,)) == [(0,)]
    cat.post("/account/digest", {"digest": "on"})
    with Database.open(gw.data_dir / "kithmail.db") as db:
        assert db.read("SELECT digest FROM user_prefs WHERE user_id = ?", (uid,)) == [(1,)]
        # Each change is in the audit log, by the user who made it.
        rows = db.read(
            "SELECT actor, action FROM audit_log WHERE action = 'digest.preference' ORDER BY id"
        )
        assert [r[0] for r in rows] == [f"web:{CAT}", f"web:{CAT}"], rows
