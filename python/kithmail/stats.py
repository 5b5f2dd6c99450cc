"""Per-day counters for the admin dashboard: verdicts per layer, and the sources turned away.

The SMTP listener calls `Stats.transaction` once per transaction, where it
logs the transaction's line (`kithmail.smtp.transaction`); the counts stay
in memory, and each worker adds them to the database every `FLUSH_S`
seconds (`Stats.flush_sync`, one short write transaction) into
``stats_daily(day, tenant, layer, action, n)`` and ``stats_sources(day,
tenant, source, action, n)``. Days are UTC dates by the server's clock.

What is counted, per recipient (one message to three users counts three):

- per layer, the most severe action that layer took for the recipient
  (`accept` < `tag` < `quarantine` < `discard` < `defer` < `reject`), and
  separately a shadow-mode decision as ``<action>/shadow``: so "spoofing /
  quarantine" reads "recipients the anti-spoofing layer held". A refusal
  at RCPT is charged to the layer its reason names (``recon.new_source`` →
  recon); refusals that are no layer's (an unknown recipient, relay
  denied, too many recipients, bad syntax) to the pseudo-layer ``smtp``.
- under the pseudo-layer ``gateway``, what became of the recipient:
  ``deliver``, ``quarantine``, ``discard``, ``defer`` or ``reject``.
- for every deferral or rejection by policy from an untrusted client, its
  source: the client's /24 (IPv4) or /48 (IPv6).

Recipients of a transaction that ended without DATA (RSET, QUIT, a
hang-up) are not counted, except those refused at RCPT; nor are journal
copies and replies to SAV challenges (discarded by design, not mail). Counts are a
dashboard, not a ledger: a crash loses at most one flush window of them,
and a window with more than `MAX_KEYS` distinct keys drops the excess
(counted in `Stats.dropped`) rather than grow without bound. Source rows
of finished days are trimmed to the top `KEEP_SOURCES` per (tenant,
action), and everything older than `KEEP_DAYS` days is pruned.

Trusts: the verdicts (the pipeline's) and the client address (the
listener's, already parsed). Addresses and tenants are only counted, never
interpreted.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from kithmail.layers import Action, Verdict

if TYPE_CHECKING:
    from kithmail.db import Database
    from kithmail.spool import Recipient

__all__ = [
    "FLUSH_S",
    "GATEWAY",
    "KEEP_DAYS",
    "SMTP",
    "SourceCount",
    "Stats",
    "day_of",
    "days_back",
    "layer_of_reason",
    "read_by_tenant",
    "read_daily",
    "read_per_day",
    "read_sources",
    "source_of",
]

log = logging.getLogger("kithmail.stats")

FLUSH_S: Final = 10.0
KEEP_DAYS: Final = 8
KEEP_SOURCES: Final = 200
MAX_KEYS: Final = 20_000  # distinct (tenant, layer, action) or (tenant, source, action) per window
GATEWAY: Final = "gateway"  # pseudo-layer: what became of each recipient
SMTP: Final = "smtp"  # pseudo-layer: refusals no layer made (unknown user, relay, syntax)

_SEVERITY: Final = {
    Action.ACCEPT: 0,
    Action.TAG: 1,
    Action.QUARANTINE: 2,
    Action.DISCARD: 3,
    Action.DEFER: 4,
    Action.REJECT: 5,
}
# Reason prefixes (the stable codes of `Verdict.reason`) → the layer they belong to.
_REASON_LAYER: Final = {
    "recon": "recon",
    "reputation": "reputation",
    "dnsbl": "reputation",
    "spf": "spoofing",
    "dkim": "spoofing",
    "dmarc": "spoofing",
    "arc": "spoofing",
    "spoofing": "spoofing",
    "antivirus": "antivirus",
    "community": "community",
    "sav": "community",
}

# Copies that are not mail to a user: a journal copy (it teaches the
# community, from the organisation's own server) and a reply to a SAV
# challenge (it confirms a sender). Both are discarded by design; counted,
# they would read as the community discarding mail.
_NOT_MAIL: Final = ("journal.", "sav.")

DailyKey = tuple[str, str, str, str]  # day, tenant, layer, action
SourceKey = tuple[str, str, str, str]  # day, tenant, source, action


def day_of(ts: float) -> str:
    """The UTC date of Unix time ``ts``, as stored: ``2026-11-25``."""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).date().isoformat()


def days_back(ts: float, n: int) -> list[str]:
    """The ``n`` days ending with the day of ``ts``, oldest first."""
    today = datetime.datetime.fromtimestamp(ts, datetime.UTC).date()
    return [(today - datetime.timedelta(days=i)).isoformat() for i in range(n - 1, -1, -1)]


def layer_of_reason(reason: str) -> str:
    """The layer a refusal's reason code names; `SMTP` for one that names none."""
    return _REASON_LAYER.get(reason.partition(".")[0], SMTP)


def source_of(ip: str) -> str | None:
    """The source an address is counted under: its /24 or /48; None when not an address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def _refusal_action(reply: str) -> str:
    return "defer" if reply[:1] == "4" else "reject"


def _per_layer(verdicts: Iterable[Verdict]) -> set[tuple[str, str]]:
    """(layer, action) as counted: each layer's most severe action, shadow ones apart."""
    worst: dict[tuple[str, bool], Action] = {}
    for v in verdicts:
        if v.shadow and v.action is Action.ACCEPT:
            continue  # a shadow accept changes nothing and would double the layer's count
        key = (str(v.layer), v.shadow)
        have = worst.get(key)
        if have is None or _SEVERITY[v.action] > _SEVERITY[have]:
            worst[key] = v.action
    return {
        (layer, f"{action}/shadow" if shadow else str(action))
        for (layer, shadow), action in worst.items()
    }


class Stats:
    """One worker's counters since its last flush. Counting is cheap and never blocks.

    ``tenant_of(domain)`` names the tenant of a local domain (None for
    others) for recipients refused before the transaction had one;
    ``clock`` is the server's (the tests move it); ``max_keys`` bounds each
    window's distinct keys (`MAX_KEYS`).
    """

    def __init__(
        self,
        clock: Callable[[], float],
        tenant_of: Callable[[str], str | None],
        *,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._clock = clock
        self._tenant_of = tenant_of
        self.max_keys = max_keys
        self._lock = threading.Lock()  # counting is on the loop, flushing in a thread
        self._daily: Counter[DailyKey] = Counter()
        self._sources: Counter[SourceKey] = Counter()
        self.dropped = 0
        self._warned = False
        self._trimmed: set[str] = set()  # finished days whose sources this process trimmed

    # --- counting (on the event loop) ---

    def transaction(
        self,
        *,
        tenant: str | None,
        client: str,
        trusted: bool,
        reply: str | None,
        refused: Sequence[tuple[str, str, str]],
        rcpt_verdicts: Sequence[Sequence[Verdict]] = (),
        message_verdicts: Sequence[Verdict] = (),
        recipients: Sequence[Recipient] | None = None,
        by_policy: bool = True,
    ) -> None:
        """Count one transaction's end.

        ``refused``: (address, reply, reason) of each recipient refused at
        RCPT. Then either ``recipients`` (accepted at end of DATA: each with
        its outcome and verdicts), or ``reply`` refusing the message for the
        recipients whose RCPT verdicts are ``rcpt_verdicts`` (a refusal by
        layers 3-4 gives ``message_verdicts``; ``by_policy`` False for our
        own faults, a full spool, which name no source), or neither (the
        transaction ended without DATA).
        """
        # Counting never costs the SMTP session anything: a failure here (a
        # tenant lookup whose database is busy) loses the count, not the mail.
        try:
            self._transaction(
                tenant=tenant,
                client=client,
                trusted=trusted,
                reply=reply,
                refused=refused,
                rcpt_verdicts=rcpt_verdicts,
                message_verdicts=message_verdicts,
                recipients=recipients,
                by_policy=by_policy,
            )
        except Exception:
            self.dropped += 1
            if not self._warned:
                self._warned = True
                log.exception("stats: a transaction could not be counted")

    def _transaction(
        self,
        *,
        tenant: str | None,
        client: str,
        trusted: bool,
        reply: str | None,
        refused: Sequence[tuple[str, str, str]],
        rcpt_verdicts: Sequence[Sequence[Verdict]] = (),
        message_verdicts: Sequence[Verdict] = (),
        recipients: Sequence[Recipient] | None = None,
        by_policy: bool = True,
    ) -> None:
        """`transaction`, unguarded."""
        day = day_of(self._clock())
        source = None if trusted else source_of(client)
        with self._lock:
            for address, why, reason in refused:
                domain = address.rpartition("@")[2].lower().rstrip(">")
                # Charged to the tenant of the domain named; a non-local one (relay
                # denied) or none (bad syntax) is no tenant's.
                owner = (self._tenant_of(domain) if domain else None) or ""
                action = _refusal_action(why)
                self._add_daily((day, owner, layer_of_reason(reason), action))
                self._add_daily((day, owner, GATEWAY, action))
                if source is not None and reason != "syntax":
                    self._add_source((day, owner, source, action))
            owner = tenant or ""
            if recipients is not None:
                for r in recipients:
                    if any(v.reason.startswith(_NOT_MAIL) for v in r.verdicts):
                        continue
                    for layer, action in _per_layer(r.verdicts):
                        self._add_daily((day, owner, layer, action))
                    self._add_daily((day, owner, GATEWAY, str(r.outcome)))
            elif reply is not None and reply[:1] in ("4", "5"):
                action = _refusal_action(reply)
                for verdicts in rcpt_verdicts:
                    counted = _per_layer([*verdicts, *message_verdicts])
                    for layer, act in counted:
                        self._add_daily((day, owner, layer, act))
                    if not any(act == action for _, act in counted):
                        # Refused by no layer: a size or syntax limit, or our own fault.
                        self._add_daily((day, owner, SMTP, action))
                    self._add_daily((day, owner, GATEWAY, action))
                    if source is not None and by_policy:
                        self._add_source((day, owner, source, action))

    def _add_daily(self, key: DailyKey) -> None:
        if key in self._daily or len(self._daily) < self.max_keys:
            self._daily[key] += 1
        else:
            self.dropped += 1

    def _add_source(self, key: SourceKey) -> None:
        if key in self._sources or len(self._sources) < self.max_keys:
            self._sources[key] += 1
        else:
            self.dropped += 1

    def pending(self) -> int:
        """How many counter keys wait for the next flush."""
        with self._lock:
            return len(self._daily) + len(self._sources)

    # --- flushing (in a thread) ---

    def flush_sync(self, database: Database) -> int:
        """Add the counts to the database and prune old days; how many keys were written.

        Blocking: call it in a thread. On a database error the counts are
        kept for the next flush (still bounded by `max_keys`) and the error
        is raised.
        """
        with self._lock:
            daily, self._daily = self._daily, Counter()
            sources, self._sources = self._sources, Counter()
        now = self._clock()
        oldest = days_back(now, KEEP_DAYS)[0]
        try:
            with database.write() as conn:
                if daily:
                    conn.executemany(
                        "INSERT INTO stats_daily (day, tenant, layer, action, n)"
                        " VALUES (?, ?, ?, ?, ?)"
                        " ON CONFLICT (day, tenant, layer, action) DO UPDATE SET n = n + excluded.n",
                        [(*k, n) for k, n in daily.items()],
                    )
                if sources:
                    conn.executemany(
                        "INSERT INTO stats_sources (day, tenant, source, action, n)"
                        " VALUES (?, ?, ?, ?, ?)"
                        " ON CONFLICT (day, tenant, source, action) DO UPDATE SET n = n + excluded.n",
                        [(*k, n) for k, n in sources.items()],
                    )
                conn.execute("DELETE FROM stats_daily WHERE day < ?", (oldest,))
                conn.execute("DELETE FROM stats_sources WHERE day < ?", (oldest,))
        except Exception:
            with self._lock:
                for dk, n in daily.items():
                    if dk in self._daily or len(self._daily) < self.max_keys:
                        self._daily[dk] += n
                for sk, n in sources.items():
                    if sk in self._sources or len(self._sources) < self.max_keys:
                        self._sources[sk] += n
            raise
        self._trim_finished_days(database, now)
        return len(daily) + len(sources)

    def _trim_finished_days(self, database: Database, now: float) -> None:
        """Keep the top `KEEP_SOURCES` sources per (tenant, action) of each finished day."""
        today = day_of(now)
        for day in days_back(now, KEEP_DAYS)[:-1]:
            if day in self._trimmed or day >= today:
                continue
            with database.write() as conn:
                groups = conn.execute(
                    "SELECT tenant, action FROM stats_sources WHERE day = ?"
                    " GROUP BY tenant, action HAVING count(*) > ?",
                    (day, KEEP_SOURCES),
                ).fetchall()
                for tenant, action in groups:
                    conn.execute(
                        "DELETE FROM stats_sources WHERE day = ? AND tenant = ? AND action = ?"
                        " AND source NOT IN (SELECT source FROM stats_sources"
                        "  WHERE day = ? AND tenant = ? AND action = ?"
                        "  ORDER BY n DESC, source LIMIT ?)",
                        (day, tenant, action, day, tenant, action, KEEP_SOURCES),
                    )
            self._trimmed.add(day)


# --- reading (the dashboard) ----------------------------------------------------------------


def _tenant_clause(tenant: str | None) -> tuple[str, tuple[object, ...]]:
    return ("", ()) if tenant is None else (" AND tenant = ?", (tenant,))


def read_daily(
    database: Database, days: Sequence[str], tenant: str | None
) -> dict[tuple[str, str], int]:
    """(layer, action) → count over ``days``, for one tenant or (None) all of them."""
    if not days:
        return {}
    where, params = _tenant_clause(tenant)
    rows = database.read(
        "SELECT layer, action, sum(n) FROM stats_daily WHERE day >= ? AND day <= ?"
        + where
        + " GROUP BY layer, action",
        (min(days), max(days), *params),
    )
    return {(str(layer), str(action)): int(str(n)) for layer, action, n in rows}


def read_per_day(
    database: Database, days: Sequence[str], tenant: str | None, layer: str = GATEWAY
) -> dict[str, dict[str, int]]:
    """day → action → count for one layer (default: what became of recipients)."""
    out: dict[str, dict[str, int]] = {d: {} for d in days}
    if not days:
        return out
    where, params = _tenant_clause(tenant)
    rows = database.read(
        "SELECT day, action, sum(n) FROM stats_daily WHERE day >= ? AND day <= ? AND layer = ?"
        + where
        + " GROUP BY day, action",
        (min(days), max(days), layer, *params),
    )
    for day, action, n in rows:
        if str(day) in out:
            out[str(day)][str(action)] = int(str(n))
    return out


def read_by_tenant(database: Database, days: Sequence[str]) -> dict[str, dict[str, int]]:
    """tenant → outcome → count over ``days`` (what became of recipients), every tenant."""
    out: dict[str, dict[str, int]] = {}
    if not days:
        return out
    rows = database.read(
        "SELECT tenant, action, sum(n) FROM stats_daily WHERE day >= ? AND day <= ? AND layer = ?"
        " GROUP BY tenant, action",
        (min(days), max(days), GATEWAY),
    )
    for tenant, action, n in rows:
        out.setdefault(str(tenant), {})[str(action)] = int(str(n))
    return out


@dataclass(frozen=True, slots=True)
class SourceCount:
    source: str
    n: int


def read_sources(
    database: Database, days: Sequence[str], tenant: str | None, action: str, limit: int = 10
) -> list[SourceCount]:
    """The sources most often turned away with ``action`` over ``days``, most first."""
    if not days:
        return []
    where, params = _tenant_clause(tenant)
    rows = database.read(
        "SELECT source, sum(n) AS total FROM stats_sources"
        " WHERE day >= ? AND day <= ? AND action = ?"
        + where
        + " GROUP BY source ORDER BY total DESC, source LIMIT ?",
        (min(days), max(days), action, *params, max(1, min(limit, 100))),
    )
    return [SourceCount(str(s), int(str(n))) for s, n in rows]
