"""A tenant admin changes their tenant's SPF softfail action in a real browser.

Debian's chromium, driven by Playwright, against a real `kith serve` with
two tenants (acme: example.test, globex: other.test) and a real dnsmasq
serving ``soft.test``'s SPF record, ``v=spf1 ip4:192.0.2.0/24 ~all``, so
that mail from soft.test sent from loopback softfails. By default a
softfail is held (``[spf] softfail = "quarantine"``). acme's admin logs
in, opens the policy page, sets softfail to "reject" and saves; the page
then shows "reject", from the tenant, replacing the built-in
"quarantine". The next softfailing message to acme is refused at RCPT
(550 5.7.23) and never held, while the same message to globex is still
accepted and held. A screenshot of each page is saved under the test's
tmp_path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import Browser, browser, browser_page, off_loop, requests_made  # noqa: F401
from dns_server import Dnsmasq, StartDnsmasq
from gateway import Gateway, Reply, make_gateway, message, run, send
from test_web_admin import USERS, setup_tenants
from web_client import PASSWORD, WEB_SECTIONS, held

OUTSIDE = "127.0.0.70"
SPF = [("soft.test", "v=spf1 ip4:192.0.2.0/24 ~all")]


@pytest.fixture
def zones(dnsmasq: StartDnsmasq) -> Dnsmasq:
    return dnsmasq(zones=("soft.test",), txt=SPF)


@pytest.fixture
def gw(tmp_path: Path, zones: Dnsmasq) -> Iterator[Gateway]:
    g = make_gateway(
        tmp_path / "gw",
        users=USERS,
        sections={
            **WEB_SECTIONS,
            "dns": {"nameservers": [zones.address], "timeout": "1s"},
            "spf": {"temperror": "defer"},
        },
    )
    setup_tenants(g)
    g.start()
    try:
        yield g
    finally:
        try:
            g.stop()
        finally:
            g.kill()


def softfailing(gw: Gateway, rcpt: str, subject: str) -> list[Reply]:
    """One message from soft.test, sent from a thread of its own (Playwright's
    sync API keeps an event loop running in this one)."""
    data = message(subject=subject, sender="news@soft.test")
    replies: list[Reply] = off_loop(run, send(gw.port, OUTSIDE, "news@soft.test", [rcpt], data))
    return replies


def test_a_tenant_admin_rejects_softfail_for_their_tenant_only(
    gw: Gateway,
    tmp_path: Path,
    browser: Browser,  # noqa: F811
) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    # Before: a softfail to either tenant is accepted and held.
    before = softfailing(gw, "ann@example.test", "before")
    assert before[-1].code == 250, [str(r) for r in before]
    assert [h["reason"] for h in held(gw, "ann@example.test")] == ["spf.softfail"]

    with browser_page(browser) as page:
        base = f"http://127.0.0.1:{gw.web_port}"
        page.goto(f"{base}/login?next=/admin/policy")
        page.screenshot(path=str(shots / "1-login.png"), full_page=True)
        page.fill("#address", "boss@example.test")
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/admin/policy")
        row = page.locator('tr[data-key="spf.softfail"]')
        assert row.locator("td.value").inner_text() == "quarantine"
        assert row.locator(".origin-built-in").count() == 1
        page.screenshot(path=str(shots / "2-policy-before.png"), full_page=True)
        row.locator("select[name=value]").select_option("reject")
        row.locator("form.set button[type=submit]").click()
        page.wait_for_url(re.compile(r".*/admin/policy\?.*done=policy_set.*"))
        assert "applies to the next message" in page.locator("p.notice").inner_text()
        row = page.locator('tr[data-key="spf.softfail"]')
        assert row.locator("td.value").inner_text() == "reject"
        assert row.locator(".origin-tenant").count() == 1
        assert "replaces quarantine (built-in)" in row.inner_text()
        page.screenshot(path=str(shots / "3-policy-after.png"), full_page=True)

        # The next softfailing message to acme is refused; to globex, still held.
        to_acme = softfailing(gw, "ann@example.test", "after acme")
        rcpt = to_acme[2]
        assert (rcpt.code, rcpt.status) == (550, "5.7.23"), str(rcpt)
        assert "after acme" not in {h["subject"] for h in held(gw, "ann@example.test")}
        to_globex = softfailing(gw, "bob@other.test", "after globex")
        assert to_globex[-1].code == 250, [str(r) for r in to_globex]
        [bobs] = held(gw, "bob@other.test")
        assert (bobs["subject"], bobs["reason"]) == ("after globex", "spf.softfail")

        # What the admin sees of it: the audit entry, and the refusal counted.
        page.goto(f"{base}/admin/audit?action=policy.")
        entry = page.locator("#audit tbody tr").first.inner_text()
        assert "web:boss@example.test" in entry and "spf.softfail" in entry
        page.screenshot(path=str(shots / "4-audit.png"), full_page=True)
        page.goto(f"{base}/admin/dashboard")
        spoofing = page.locator('#layers tr[data-layer="spoofing"]')
        assert spoofing.locator('td[data-label="reject today"]').text_content() == "1"
        assert page.locator("svg").count() == 3
        page.screenshot(path=str(shots / "5-dashboard.png"), full_page=True)
        # Charts and all, nothing was fetched from anywhere but the gateway.
        assert all(r.url.startswith(base) for r in requests_made(page))
    for name in ("1-login", "2-policy-before", "3-policy-after", "4-audit", "5-dashboard"):
        assert (shots / f"{name}.png").stat().st_size > 1000
