"""A real browser for the web UI's tests: Debian's chromium driven by Playwright.

``browser`` (a module-scoped fixture) launches ``/usr/bin/chromium``
headless with the flags of /work/shared/REAL-PARTS.md — no sandbox (we run
as root), no GPU, no background networking, and every host name but
127.0.0.1 resolving to nothing, so a page can never reach the internet.
`browser_page(browser)` opens a fresh context (its own cookies) and page
and watches it: every JavaScript dialog is recorded (`dialogs(page)`) and
dismissed, and leaving the block fails the test if any ``alert``,
``prompt`` or ``beforeunload`` dialog opened — the UI itself only ever
asks ``confirm`` (before deleting or blocking), so an alert can only be
script that a message smuggled into the page. Every request the page
makes is recorded too (`requests_made(page)`, Playwright's `Request`
objects, whose ``failure`` says ``"csp"`` when the Content-Security-Policy
stopped it), to show that nothing was fetched from elsewhere.

Playwright's sync API keeps an event loop running in the test's thread;
run asyncio code (an SMTP client) through `off_loop`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from playwright.sync_api import Browser, Dialog, Page, Request, sync_playwright

__all__ = [
    "LAUNCH_ARGS",
    "Browser",
    "Page",
    "browser",
    "browser_page",
    "dialogs",
    "off_loop",
    "requests_made",
]

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@dataclass(frozen=True)
class SeenDialog:
    type: str
    message: str
    url: str


_dialogs: weakref.WeakKeyDictionary[Page, list[SeenDialog]] = weakref.WeakKeyDictionary()
_requests: weakref.WeakKeyDictionary[Page, list[Request]] = weakref.WeakKeyDictionary()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            yield b
        finally:
            b.close()


def dialogs(page: Page) -> list[SeenDialog]:
    """Every dialog the page has opened so far (confirm included)."""
    return list(_dialogs.get(page, []))


def requests_made(page: Page) -> list[Request]:
    """Every request the page (and its frames) made so far, blocked ones included."""
    return list(_requests.get(page, []))


@contextlib.contextmanager
def browser_page(
    browser: Browser, *, phone: bool = False, accept_confirm: bool = True
) -> Iterator[Page]:
    """A fresh context and page; fails on leaving if script opened an alert or prompt."""
    context = browser.new_context(
        viewport=PHONE if phone else DESKTOP,
        is_mobile=phone,
        has_touch=phone,
        device_scale_factor=2 if phone else 1,
        java_script_enabled=True,
    )
    page = context.new_page()
    seen: list[SeenDialog] = []
    urls: list[Request] = []
    _dialogs[page] = seen
    _requests[page] = urls

    def on_dialog(dialog: Dialog) -> None:
        seen.append(SeenDialog(dialog.type, dialog.message, page.url))
        if dialog.type == "confirm" and accept_confirm:
            dialog.accept()
        else:
            dialog.dismiss()

    def on_request(request: Request) -> None:
        urls.append(request)

    page.on("dialog", on_dialog)
    page.on("request", on_request)
    try:
        yield page
    finally:
        context.close()
    script = [d for d in seen if d.type != "confirm"]
    assert script == [], f"script ran in the page: {script}"


T = TypeVar("T")


def off_loop(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """``fn(*args, **kw)`` in a thread of its own (Playwright's loop runs in this one)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kw).result(timeout=120)
