"""The admin dashboard's figures and its small charts, drawn on the server as SVG.

`build(...)` gathers what an admin sees first: today's and this week's
verdicts per layer, what became of each recipient over the last seven
days, the sources most often deferred and rejected, the delivery queue's
depth and the held mail — for one tenant (a tenant admin's, or the one a
global admin picked) or for the whole gateway. The counts are
`kithmail.stats`' per-day counters; they lag by at most one flush of
another worker (this worker's are flushed before reading).

The charts are inline SVG made here from numbers and our own labels, every
text escaped; they use presentation attributes only (``fill``,
``font-size``, ``currentColor`` for the page's text colour), never inline
style or script (the CSP allows neither), and need nothing
from outside. Each chart carries a title and a text table beside it, so
the figures are readable without the picture.

Trusts: the database's counters (numbers); the tenant name is the
caller's, already checked against the principal.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any, Final

from markupsafe import Markup
from prometheus_client import REGISTRY

from kithmail import stats
from kithmail.db import Database

__all__ = [
    "ACTIONS",
    "LAYERS",
    "Dashboard",
    "build",
    "layer_bars",
    "outcome_columns",
    "queue_depth",
]

LAYERS: Final = ("recon", "reputation", "spoofing", "antivirus", "community", stats.SMTP)
LAYER_LABELS: Final = {
    "recon": "Recon",
    "reputation": "Reputation",
    "spoofing": "Anti-spoofing",
    "antivirus": "Anti-virus",
    "community": "Community",
    stats.SMTP: "SMTP (no layer)",
}
ACTIONS: Final = ("accept", "tag", "quarantine", "discard", "defer", "reject")
OUTCOMES: Final = ("deliver", "quarantine", "discard", "defer", "reject")
# Colours that read on light and dark backgrounds alike.
COLOURS: Final = {
    "accept": "#3f9b5a",
    "deliver": "#3f9b5a",
    "tag": "#3a8fb7",
    "quarantine": "#d49a1f",
    "discard": "#8a8f98",
    "defer": "#e06c2b",
    "reject": "#c43b34",
}


@dataclass(frozen=True, slots=True)
class Dashboard:
    """Everything the dashboard shows, for the page and for the API alike."""

    tenant: str | None  # None: the whole gateway
    today: str
    days: tuple[str, ...]  # the week, oldest first
    today_by_layer: dict[str, dict[str, int]]  # layer -> action -> n
    week_by_layer: dict[str, dict[str, int]]
    today_outcomes: dict[str, int]  # deliver, quarantine, discard, defer, reject
    week_outcomes: dict[str, int]
    per_day: dict[str, dict[str, int]]  # day -> outcome -> n
    top_deferred: list[stats.SourceCount]
    top_rejected: list[stats.SourceCount]
    queue: int | None  # messages waiting for delivery (gateway-wide); None: unknown
    held: int  # held copies in the quarantine (of the tenant)
    shadow: dict[str, dict[str, int]] = field(default_factory=dict)  # week: layer -> action -> n
    # The whole gateway's view only: tenant ("" for none: relay attempts,
    # bad syntax) -> outcome -> n, today.
    by_tenant: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "today": self.today,
            "days": list(self.days),
            "today_by_layer": self.today_by_layer,
            "week_by_layer": self.week_by_layer,
            "week_shadow_by_layer": self.shadow,
            "today_outcomes": self.today_outcomes,
            "week_outcomes": self.week_outcomes,
            "per_day": self.per_day,
            "top_deferred_sources": [{"source": s.source, "n": s.n} for s in self.top_deferred],
            "top_rejected_sources": [{"source": s.source, "n": s.n} for s in self.top_rejected],
            "queue_messages": self.queue,
            "held": self.held,
            "today_by_tenant": self.by_tenant,
        }


def queue_depth() -> int | None:
    """Messages with a recipient still to deliver: the queue's own gauge in this worker."""
    value = REGISTRY.get_sample_value("kithmail_queue_messages")
    return None if value is None else int(value)


def _by_layer(
    counts: Mapping[tuple[str, str], int],
) -> tuple[dict[str, dict[str, int]], dict[str, int], dict[str, dict[str, int]]]:
    layers: dict[str, dict[str, int]] = {layer: {} for layer in LAYERS}
    outcomes: dict[str, int] = {o: 0 for o in OUTCOMES}
    shadow: dict[str, dict[str, int]] = {}
    for (layer, action), n in counts.items():
        if layer == stats.GATEWAY:
            outcomes[action] = outcomes.get(action, 0) + n
        elif action.endswith("/shadow"):
            shadow.setdefault(layer, {})[action.removesuffix("/shadow")] = n
        else:
            layers.setdefault(layer, {})[action] = n
    return layers, outcomes, shadow


def _held(database: Database, tenant: str | None) -> int:
    if tenant is None:
        rows = database.read("SELECT count(*) FROM quarantine")
    else:
        rows = database.read("SELECT count(*) FROM quarantine WHERE tenant = ?", (tenant,))
    return int(str(rows[0][0]))


def build_sync(database: Database, now: float, tenant: str | None) -> Dashboard:
    """The dashboard of ``tenant`` (None: every tenant) at ``now``. Blocking reads."""
    days = stats.days_back(now, 7)
    today = days[-1]
    t_layers, t_outcomes, _ = _by_layer(stats.read_daily(database, [today], tenant))
    w_layers, w_outcomes, w_shadow = _by_layer(stats.read_daily(database, days, tenant))
    return Dashboard(
        tenant=tenant,
        today=today,
        days=tuple(days),
        today_by_layer=t_layers,
        week_by_layer=w_layers,
        today_outcomes=t_outcomes,
        week_outcomes=w_outcomes,
        per_day=stats.read_per_day(database, days, tenant),
        top_deferred=stats.read_sources(database, days, tenant, "defer"),
        top_rejected=stats.read_sources(database, days, tenant, "reject"),
        queue=queue_depth() if tenant is None else None,
        held=_held(database, tenant),
        shadow=w_shadow,
        by_tenant=stats.read_by_tenant(database, [today]) if tenant is None else {},
    )


async def build(
    database: Database, now: float, tenant: str | None, pending: stats.Stats | None = None
) -> Dashboard:
    """`build_sync` in a thread, after flushing this worker's own counts (``pending``)."""
    if pending is not None and pending.pending():
        # On failure the figures are up to one flush old: still worth showing.
        with contextlib.suppress(Exception):
            await asyncio.to_thread(pending.flush_sync, database)
    return await asyncio.to_thread(build_sync, database, now, tenant)


# ---------------------------------------------------------------- charts


def _num(n: float) -> str:
    return f"{n:.1f}".rstrip("0").rstrip(".")


def _scale_max(total: int) -> int:
    """A round axis maximum at or above ``total`` (1, 2, 5 × 10^k)."""
    if total <= 0:
        return 1
    k = 1
    while k * 10 <= total:
        k *= 10
    for m in (1, 2, 5, 10):
        if total <= m * k:
            return m * k
    return 10 * k


def layer_bars(
    by_layer: Mapping[str, Mapping[str, int]], *, title: str, width: int = 560
) -> Markup:
    """Horizontal stacked bars, one per layer, one segment per action."""
    rows = [(layer, by_layer.get(layer, {})) for layer in LAYERS]
    label_w, bar_h, gap, top = 130, 18, 8, 26
    legend_h = 24
    height = top + len(rows) * (bar_h + gap) + legend_h
    plot_w = width - label_w - 60
    biggest = _scale_max(max((sum(a.values()) for _, a in rows), default=0))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {width} {height}" width="100%" '
        f'aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text x="0" y="16" font-size="14" font-weight="600" fill="currentColor">{escape(title)}</text>',
    ]
    for i, (layer, actions) in enumerate(rows):
        y = top + i * (bar_h + gap)
        out.append(
            f'<text x="{label_w - 8}" y="{y + bar_h - 5}" text-anchor="end" font-size="12" fill="currentColor">'
            f"{escape(LAYER_LABELS.get(layer, layer))}</text>"
        )
        out.append(
            f'<rect x="{label_w}" y="{y}" width="{plot_w}" height="{bar_h}" fill="currentColor" fill-opacity="0.06"/>'
        )
        x = float(label_w)
        total = 0
        for action in ACTIONS:
            n = actions.get(action, 0)
            if n <= 0:
                continue
            w = plot_w * n / biggest
            out.append(
                f'<rect x="{_num(x)}" y="{y}" width="{_num(max(w, 1.0))}" height="{bar_h}" '
                f'fill="{COLOURS[action]}"><title>{escape(LAYER_LABELS.get(layer, layer))}: '
                f"{n} {escape(action)}</title></rect>"
            )
            x += w
            total += n
        out.append(
            f'<text x="{_num(x + 6)}" y="{y + bar_h - 5}" font-size="12" fill="currentColor">{total}</text>'
        )
    out.append(_legend(ACTIONS, 0, height - 8))
    out.append("</svg>")
    return Markup("".join(out))


def outcome_columns(
    per_day: Mapping[str, Mapping[str, int]], days: Sequence[str], *, title: str, width: int = 560
) -> Markup:
    """Stacked columns, one per day, one segment per outcome of the recipients."""
    top, plot_h, axis_h, legend_h = 26, 140, 20, 24
    height = top + plot_h + axis_h + legend_h
    left = 40
    col_w = (width - left) / max(len(days), 1)
    biggest = _scale_max(max((sum(per_day.get(d, {}).values()) for d in days), default=0))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {width} {height}" width="100%" '
        f'aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text x="0" y="16" font-size="14" font-weight="600" fill="currentColor">{escape(title)}</text>',
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end" font-size="11" fill="currentColor" fill-opacity="0.7">'
        f"{biggest}</text>",
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end" font-size="11" fill="currentColor" fill-opacity="0.7">0</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width}" y2="{top + plot_h}" '
        f'stroke="currentColor" stroke-opacity="0.4"/>',
    ]
    for i, day in enumerate(days):
        x = left + i * col_w + col_w * 0.15
        w = col_w * 0.7
        y = float(top + plot_h)
        counts = per_day.get(day, {})
        for outcome in OUTCOMES:
            n = counts.get(outcome, 0)
            if n <= 0:
                continue
            h = plot_h * n / biggest
            y -= h
            out.append(
                f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(w)}" height="{_num(max(h, 1.0))}" '
                f'fill="{COLOURS[outcome]}"><title>{escape(day)}: {n} {escape(outcome)}</title>'
                "</rect>"
            )
        out.append(
            f'<text x="{_num(x + w / 2)}" y="{top + plot_h + 14}" text-anchor="middle" '
            f'font-size="11" fill="currentColor" fill-opacity="0.7">{escape(day[5:])}</text>'
        )
    out.append(_legend(OUTCOMES, 0, height - 8))
    out.append("</svg>")
    return Markup("".join(out))


def _legend(names: Sequence[str], x: int, y: int) -> str:
    parts = []
    for name in names:
        parts.append(
            f'<rect x="{x}" y="{y - 10}" width="10" height="10" fill="{COLOURS[name]}"/>'
            f'<text x="{x + 14}" y="{y}" font-size="11" fill="currentColor">{escape(name)}</text>'
        )
        x += 24 + 8 * len(name)
    return "".join(parts)
