"""A user in a real browser: log in, find a held message by searching, release it, read it at home.

Debian's chromium driven by Playwright (`browser`) against a real `kith
serve` whose community layer holds a stranger's mail. Ann logs in with
the login form, searches her quarantine for the invoice among other held
mail, opens it, releases it, and the message is then in her Maildir.
On the way she opens hostile messages (script in the subject, in an
encoded word, in the text and HTML parts, a remote pixel, U+202E in names)
and no script runs, nothing is fetched from elsewhere, and the override
is shown, not obeyed. A screenshot of each page (desktop, and the
quarantine on a phone) is saved under the test's tmp_path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import (  # noqa: F401
    Browser,
    Page,
    browser,
    browser_page,
    dialogs,
    off_loop,
    requests_made,
)
from gateway import Gateway, message, run, running_gateway
from hostile import RLO, plain, rich, send_rlo_sender
from web_client import PASSWORD, WEB_SECTIONS, held, hold

ANN = "ann@example.test"


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    with running_gateway(
        tmp_path / "gw", users=(ANN, "bob@example.test"), sections=WEB_SECTIONS
    ) as g:
        yield g


def _shot(page: Page, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def test_a_user_finds_a_held_message_releases_it_and_it_arrives(
    gw: Gateway,
    tmp_path: Path,
    browser: Browser,  # noqa: F811
) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    invoice = message(subject="Invoice 4711", sender="billing@shop.test", body="Amount: 42 EUR\r\n")
    off_loop(hold, gw, [ANN], invoice, sender="billing@shop.test")
    for n in range(3):
        off_loop(hold, gw, [ANN], message(subject=f"Weekly news {n}", sender="news@list.test"))
    off_loop(hold, gw, [ANN], plain(rcpt=ANN))
    off_loop(hold, gw, [ANN], rich(rcpt=ANN))
    assert off_loop(run, send_rlo_sender(gw.port, ANN)) == 250
    assert len(held(gw, ANN)) == 7
    base = f"http://127.0.0.1:{gw.web_port}"

    with browser_page(browser) as page:
        page.goto(f"{base}/quarantine")
        page.wait_for_url(re.compile(r".*/login\?next=%2Fquarantine$"))
        _shot(page, shots, "01-login")
        page.fill("#address", ANN)
        page.fill("#password", "not my password")
        page.click("button[type=submit]")
        assert "Wrong mail address or password." in page.locator("p.notice.error").inner_text()
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/quarantine")
        rows = page.locator("table.quarantine tbody tr")
        assert rows.count() == 7
        assert "7 held messages" in page.inner_text("main")
        # The envelope sender's override is shown as a marker, not obeyed.
        listing = page.inner_text("table.quarantine")
        assert "gpj.exe[U+202E]ann@remote.test" in listing and RLO not in listing
        _shot(page, shots, "02-quarantine")

        # The hostile subjects are on the page as text.
        subjects = page.locator("td.subject a").all_inner_texts()
        assert "<script>alert('subject')</script>" in subjects
        assert any(s.startswith("<script>alert('encoded')</script>") for s in subjects)

        # Search: by subject, then by sender.
        page.fill("#q-subject", "4711")
        page.click("form.search button[type=submit]")
        page.wait_for_url(re.compile(r".*/quarantine\?.*subject=4711.*"))
        assert rows.count() == 1 and "Invoice 4711" in rows.first.inner_text()
        assert "1 held message matches the search" in page.inner_text("main")
        _shot(page, shots, "03-search")
        page.fill("#q-subject", "")
        page.fill("#q-sender", "news@list")
        page.click("form.search button[type=submit]")
        page.wait_for_url(re.compile(r".*sender=news%40list.*"))
        assert rows.count() == 3

        # The hostile messages: text view, then the HTML in its sandboxed frame.
        page.goto(f"{base}/quarantine")
        page.click("text=<script>alert('encoded')</script>")
        page.wait_for_url(re.compile(r".*/quarantine/[0-9a-z]{19}/0$"))
        body = page.inner_text("main")
        assert "invoice[U+202E]gpj.exe" in body and RLO not in body
        assert "<script>alert('text')</script>" in page.inner_text("pre.body")
        _shot(page, shots, "04-hostile-text")
        page.click("text=Show the HTML version")
        page.wait_for_url(re.compile(r".*\?view=html$"))
        frame = page.frame_locator("iframe.html-part")
        assert "Your invoice" in frame.locator("body").inner_text()
        page.wait_for_timeout(300)  # room for a script, a refresh or a pixel to misbehave
        _shot(page, shots, "05-hostile-html")
        assert page.url.endswith("?view=html")
        # The pixel was asked for, and stopped by the frame's CSP before it left.
        outside = [(r.url, r.failure) for r in requests_made(page) if not r.url.startswith(base)]
        assert outside == [("http://evil.test/pixel.png", "csp")], outside

        # The invoice: open it, release it.
        page.goto(f"{base}/quarantine?subject=4711")
        page.click("text=Invoice 4711")
        page.wait_for_url(re.compile(r".*/quarantine/[0-9a-z]{19}/0$"))
        assert "Amount: 42 EUR" in page.inner_text("pre.body")
        assert "billing@shop.test" in page.inner_text("dl.fields")
        _shot(page, shots, "06-message")
        page.click("form.actions button[value=release]")
        page.wait_for_url(re.compile(r".*/quarantine\?.*done=release.*"))
        assert "Released 1 message" in page.locator("p.notice").inner_text()
        _shot(page, shots, "07-released")

        # The rest of her pages.
        page.goto(f"{base}/community")
        page.fill("#c-entry", "billing@shop.test")
        page.click('form[action="/community/add"] button[type=submit]')
        page.wait_for_url(re.compile(r".*/community\?done=added.*"))
        assert "billing@shop.test" in page.locator("table.community").first.inner_text()
        _shot(page, shots, "08-community")
        page.goto(f"{base}/account")
        _shot(page, shots, "09-account")
        # Deleting asks first (the UI's own confirm), then deletes.
        page.goto(f"{base}/quarantine?sender=news@list")
        page.check('input[data-select-all="id"]')
        page.click("button[value=delete]")
        page.wait_for_url(re.compile(r".*done=delete.*"))
        assert "Deleted 3 messages." in page.locator("p.notice").inner_text()
        assert [d.type for d in dialogs(page)] == ["confirm"]

    with browser_page(browser, phone=True) as phone:
        phone.goto(f"{base}/login")
        _shot(phone, shots, "10-phone-login")
        phone.fill("#address", ANN)
        phone.fill("#password", PASSWORD)
        phone.click("button[type=submit]")
        phone.wait_for_url(f"{base}/quarantine")
        # On a phone, rows are cards that fit the screen: no sideways scrolling.
        width = phone.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width
        _shot(phone, shots, "11-phone-quarantine")

    gw.wait_for("the released invoice in the Maildir", lambda: gw.messages(ANN))
    (delivered,) = gw.messages(ANN)
    assert b"Subject: Invoice 4711" in delivered and b"Amount: 42 EUR" in delivered
    assert [h["subject"] for h in held(gw, ANN) if "4711" in h["subject"]] == []
    for png in sorted(shots.iterdir()):
        assert png.stat().st_size > 1000, png
    assert len(list(shots.iterdir())) == 11
