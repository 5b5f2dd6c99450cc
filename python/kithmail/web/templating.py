"""Server-rendered pages: one Jinja2 environment, autoescaping everything.

`render(request, template, context)` adds what every page needs: the
principal (or None), the session's CSRF token (forms put it in a hidden
field ``csrf``; ``kithmail.js`` sends it as ``X-CSRF-Token``), the
navigation (admin links for admins: `ADMIN_NAV`, which the admin routers
fill in), and the current path. Templates extend ``base.html`` (blocks
``title`` and ``content``).

Every value from a message or a user is escaped by Jinja2's autoescape;
no template uses ``|safe`` on such a value, and no page has inline script
(the CSP forbids it), so a hostile subject is text, never markup.
Templates and static files live beside this module and ship in the wheel.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

__all__ = ["ADMIN_NAV", "STATIC_DIR", "TEMPLATE_DIR", "NavLink", "render", "templates"]

HERE: Final = Path(__file__).parent
TEMPLATE_DIR: Final = HERE / "templates"
STATIC_DIR: Final = HERE / "static"


@dataclass(frozen=True, slots=True)
class NavLink:
    href: str
    label: str
    global_only: bool = False  # shown to global admins only


USER_NAV: Final = (
    NavLink("/quarantine", "Quarantine"),
    NavLink("/community", "Community"),
    NavLink("/account", "Account"),
)
# The admin half appends its pages here (shown to tenant and global admins).
ADMIN_NAV: list[NavLink] = []


def _when(ts: int | float | None) -> str:
    """Unix seconds as ``2026-11-25 16:03 UTC``; "" for none."""
    if not ts:
        return ""
    t = datetime.datetime.fromtimestamp(int(ts), datetime.UTC)
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _size(n: int | None) -> str:
    """Bytes for people: ``512 B``, ``12.3 KB``, ``4.0 MB``."""
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _make_env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters["when"] = _when
    env.filters["size"] = _size
    return env


templates: Final = _make_env()


def render(
    request: Request, template: str, context: dict[str, Any], status: int = 200
) -> HTMLResponse:
    """``template`` rendered with ``context`` plus principal, csrf, nav and path."""
    p = getattr(request.state, "principal", None)
    nav: list[NavLink] = []
    admin_nav: list[NavLink] = []
    if p is not None:
        nav = list(USER_NAV)
        if p.is_admin:
            admin_nav = [n for n in ADMIN_NAV if p.is_global or not n.global_only]
    full: dict[str, Any] = {
        "principal": p,
        "csrf": p.csrf if p is not None else "",
        "nav": nav,
        "admin_nav": admin_nav,
        "path": request.url.path,
        "title": "",
    }
    full.update(context)
    body = templates.get_template(template).render(full)
    return HTMLResponse(body, status_code=status)
