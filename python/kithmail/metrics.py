"""The Prometheus metrics of a kithmail process, and their /metrics endpoint.

Names follow Prometheus conventions: `kithmail_` prefix, base units
(seconds), `_total` counters, and label values from closed sets only (a
layer, an action, a front end, a result) — never an address or an IP.

With several worker processes, each worker records into prometheus-client's
multiprocess files under `<data_dir>/metrics` and the supervising process
serves the merged view; set up by `multiprocess_dir` before any worker
creates a metric. Metrics without labels are therefore made lazily (at
first use, after the fork), never at import.

What is a state rather than an event — table sizes, the map in use, the
quarantine's size, free disk, each worker's memory and CPU — is read when
/metrics is scraped (`StateCollector`, `WorkerProcessCollector`), from
the process that serves it, so it is never stale and never summed twice.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
    values,
)
from prometheus_client import multiprocess as prom_mp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "DNS_RESULTS",
    "DNS_TYPES",
    "SAV_RESULTS",
    "Metrics",
    "SmtpMetrics",
    "StateCollector",
    "WorkerProcessCollector",
    "declare",
    "dns_query",
    "multiprocess_dir",
    "quarantine_expired",
    "render",
    "retention_deleted",
    "sav_challenge",
    "sav_suppressed",
    "serve_metrics",
]

_LATENCY = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class _LayerCollectors:
    """The collectors every front end shares, made once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.verdicts = Counter(
            "kithmail_verdicts",
            "Layer decisions, by front end, layer and action (shadow: recorded, not enforced).",
            ["frontend", "layer", "action", "shadow"],
            registry=registry,
        )
        self.requests = Counter(
            "kithmail_policy_requests",
            "Policy-service requests by result: answered, malformed, refused, error.",
            ["result"],
            registry=registry,
        )
        self.layer_seconds = Histogram(
            "kithmail_layer_seconds",
            "Time a layer took to decide, by front end and layer.",
            ["frontend", "layer"],
            buckets=_LATENCY,
            registry=registry,
        )


_SHARED: dict[int, _LayerCollectors] = {}


class Metrics:
    """The metrics one front end records (`frontend` is "smtp" or "policy").

    Several front ends in one process (`kith serve` runs the SMTP listener
    and the policy service) share the collectors, told apart by label.
    """

    def __init__(self, frontend: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.frontend = frontend
        shared = _SHARED.get(id(registry))
        if shared is None:
            shared = _SHARED[id(registry)] = _LayerCollectors(registry)
        self.verdicts = shared.verdicts
        self.requests = shared.requests
        self.layer_seconds = shared.layer_seconds

    def verdict(self, layer: str, action: str, shadow: bool) -> None:
        self.verdicts.labels(self.frontend, layer, action, "yes" if shadow else "no").inc()


# Recon imposes minutes to hours; the buckets span min_delay to retry_window.
_RECON_DELAY = (60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 86400)
_SESSION = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600)
_SIZE = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
# Commands outside this set are counted as "other": the label set stays closed.
SMTP_COMMANDS = frozenset(
    {
        "CONNECT",
        "EHLO",
        "HELO",
        "MAIL",
        "RCPT",
        "DATA",
        "RSET",
        "NOOP",
        "QUIT",
        "STARTTLS",
        "VRFY",
        "EXPN",
        "HELP",
        "AUTH",
        "XCLIENT",
        "PROXY",
        "TIMEOUT",
    }
)


class SmtpMetrics:
    """What the inbound SMTP listener records, beside the layers' `Metrics`."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.connections = Counter(
            "kithmail_smtp_connections",
            "Connections by result: served, or refused before the greeting "
            "(limit, rate, pregreet, proxy).",
            ["result"],
            registry=registry,
        )
        self.sessions = Gauge(
            "kithmail_smtp_sessions",
            "SMTP sessions open now.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.session_seconds = Histogram(
            "kithmail_smtp_session_seconds",
            "How long SMTP sessions lasted.",
            buckets=_SESSION,
            registry=registry,
        )
        self.replies = Counter(
            "kithmail_smtp_replies",
            "SMTP replies sent, by command, reply code and its class (2xx, 3xx, 4xx, 5xx).",
            ["command", "code", "class"],
            registry=registry,
        )
        self.messages = Counter(
            "kithmail_smtp_messages",
            "Messages at end of DATA by result: accepted (250), rejected (5xx), deferred (4xx).",
            ["result"],
            registry=registry,
        )
        self.message_bytes = Histogram(
            "kithmail_smtp_message_bytes",
            "Size of accepted messages.",
            buckets=_SIZE,
            registry=registry,
        )
        self.recon_delay = Histogram(
            "kithmail_recon_delay_seconds",
            "Delay Recon imposed on mail that got through: first deferral to acceptance.",
            buckets=_RECON_DELAY,
            registry=registry,
        )

    def reply(self, command: str, code: int) -> None:
        if command not in SMTP_COMMANDS:
            command = "other"
        self.replies.labels(command, str(code), f"{code // 100}xx").inc()


def multiprocess_dir(data_dir: Path) -> Path:
    """Prepare `<data_dir>/metrics` for worker processes; call before forking.

    prometheus-client picks its multiprocess storage from the environment
    when a metric is first created, so the variable is set here, in the
    parent, before any worker exists. Old files from a previous run are
    removed: counters start from zero with the process, as Prometheus expects.
    """
    d = data_dir / "metrics"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(d)
    # prometheus-client chose its value storage when it was imported; choose
    # again now that the directory is set (metrics made later use it).
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return d


def serve_metrics(listener: str, *, multiprocess: bool) -> None:
    """Serve /metrics on "IP:PORT" from a background thread."""
    host, _, port = listener.rpartition(":")
    if multiprocess:
        # Called in the supervising process, before it forks the workers.
        registry = CollectorRegistry()
        prom_mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(WorkerProcessCollector(os.getpid()))
        start_http_server(int(port), host.strip("[]"), registry=registry)
    else:
        start_http_server(int(port), host.strip("[]"))


# ---------------------------------------------------------------- event metrics made at first use

_T = TypeVar("_T")
_LAZY: dict[tuple[int, str], Any] = {}
_LAZY_LOCK = threading.Lock()


def _lazy(registry: CollectorRegistry, name: str, make: Callable[[], _T]) -> _T:
    """One collector per (registry, name), made at first use (after any fork)."""
    key = (id(registry), name)
    with _LAZY_LOCK:
        c = _LAZY.get(key)
        if c is None:
            c = _LAZY[key] = make()
    return c  # type: ignore[no-any-return,unused-ignore]


# Record types asked (A/AAAA/TXT/MX by the resolver; PTR and SPF by pyspf).
DNS_TYPES = frozenset({"A", "AAAA", "TXT", "MX", "PTR", "SPF"})
# How a query ended: `kithmail.dns.Status`'s values.
DNS_RESULTS = frozenset({"answer", "nxdomain", "nodata", "timeout", "failure", "malformed"})
_DNS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _dns(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
    return _lazy(
        registry,
        "dns",
        lambda: (
            Counter(
                "kithmail_dns_queries",
                "DNS queries by record type and result "
                "(answer, nxdomain, nodata, timeout, failure, malformed).",
                ["type", "result"],
                registry=registry,
            ),
            Histogram(
                "kithmail_dns_query_seconds",
                "Time of one DNS query, retries and TCP fallback included, by record type.",
                ["type"],
                buckets=_DNS_SECONDS,
                registry=registry,
            ),
        ),
    )


def dns_query(
    rdtype: str, result: str, seconds: float, *, registry: CollectorRegistry = REGISTRY
) -> None:
    """Count one DNS query (`rdtype` and `result` outside their closed sets count as "other")."""
    queries, latency = _dns(registry)
    t = rdtype if rdtype in DNS_TYPES else "other"
    queries.labels(t, result if result in DNS_RESULTS else "other").inc()
    latency.labels(t).observe(seconds)


def quarantine_expired(copies: int, *, registry: CollectorRegistry = REGISTRY) -> None:
    """Count held copies deleted by retention (`quarantine_days`)."""
    c = _lazy(
        registry,
        "quarantine_expired",
        lambda: Counter(
            "kithmail_quarantine_expired",
            "Held copies deleted by retention when their quarantine_days ran out.",
            registry=registry,
        ),
    )
    c.inc(copies)


RETENTION_KINDS = ("recon", "learned", "audit")


def _closed_counter(
    registry: CollectorRegistry, name: str, doc: str, label: str, values: tuple[str, ...]
) -> Counter:
    """A counter with one label of a closed set, every value made at zero on first use."""

    def make() -> Counter:
        c = Counter(f"kithmail_{name}", doc, [label], registry=registry)
        for v in values:
            c.labels(v)
        return c

    return _lazy(registry, name, make)


def _retention(registry: CollectorRegistry) -> Counter:
    return _closed_counter(
        registry,
        "retention_deleted",
        "Rows deleted by the periodic retention sweep, by kind: recon (masked source "
        "addresses past retry_window or pass_ttl), learned (reputation counters past "
        "learned_ttl), audit (audit log rows past audit_retention).",
        "kind",
        RETENTION_KINDS,
    )


def retention_deleted(kind: str, rows: int, *, registry: CollectorRegistry = REGISTRY) -> None:
    """Count `rows` deleted by retention (`kind` one of RETENTION_KINDS, else "other")."""
    if rows:
        _retention(registry).labels(kind if kind in RETENTION_KINDS else "other").inc(rows)


def _sav_challenges(registry: CollectorRegistry) -> Counter:
    return _closed_counter(
        registry,
        "sav_challenges",
        "SAV challenges by what became of them: sent, verified (by reply or page), "
        "expired (unanswered).",
        "result",
        SAV_RESULTS,
    )


SAV_RESULTS = ("sent", "verified", "expired")


def sav_challenge(result: str, n: int = 1, *, registry: CollectorRegistry = REGISTRY) -> None:
    """Count `n` challenges that were sent, verified or expired."""
    if n:
        _sav_challenges(registry).labels(result if result in SAV_RESULTS else "other").inc(n)


def _sav_suppressed(registry: CollectorRegistry) -> Counter:
    return _lazy(
        registry,
        "sav_suppressed",
        lambda: Counter(
            "kithmail_sav_challenges_suppressed",
            "SAV challenges not sent, by reason (sav.unauthenticated, sav.bulk, "
            "sav.interval, sav.rate_domain, ...).",
            ["reason"],
            registry=registry,
        ),
    )


def sav_suppressed(
    reason: str, reasons: Iterable[str], *, registry: CollectorRegistry = REGISTRY
) -> None:
    """Count one challenge not sent, by its reason code (one of `reasons`, else "other")."""
    _sav_suppressed(registry).labels(reason if reason in reasons else "other").inc()


def declare(registry: CollectorRegistry = REGISTRY) -> None:
    """Make the families that are otherwise made at first use, at zero.

    Called by the process that serves /metrics, after the fork, before its
    first page: a dashboard or an alert then finds every family even before
    the first DNS query, challenge or expiry.
    """
    _dns(registry)
    _sav_challenges(registry)
    _sav_suppressed(registry)
    quarantine_expired(0, registry=registry)
    _retention(registry)


# ---------------------------------------------------------------- state read at scrape time


class StateCollector(Collector):
    """Gauges read when /metrics is scraped: the core, the quarantine, the spool's disk.

    `core_stats` is `Core.stats`; `quarantine` answers the held copies by
    layer as (layer, copies, bytes) rows; `spool_dir` is the spool's root.
    A part that cannot be read is left out of that scrape (an absent series,
    which the alerts treat as unknown) rather than failing the whole page.
    """

    def __init__(
        self,
        *,
        core_stats: Callable[[], dict[str, int]] | None = None,
        quarantine: Callable[[], Sequence[tuple[str, int, int]]] | None = None,
        spool_dir: Path | None = None,
    ) -> None:
        self.core_stats = core_stats
        self.quarantine = quarantine
        self.spool_dir = spool_dir

    def describe(self) -> Iterable[Metric]:
        return []  # collected per scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        yield from self._core()
        yield from self._quarantine()
        yield from self._disk()

    def _core(self) -> Iterator[Metric]:
        if self.core_stats is None:
            return
        try:
            st = self.core_stats()
        except Exception:  # a closed or broken core: absent this time
            return
        rows = GaugeMetricFamily(
            "kithmail_core_rows", "Rows in each core (LMDB) table.", labels=["table"]
        )
        for table in ("recon", "reputation", "community"):
            key = "reputation_intervals" if table == "reputation" else f"{table}_rows"
            if key in st:
                rows.add_metric([table], st[key])
        yield rows
        for key, name, text in (
            ("map_size_bytes", "kithmail_core_map_size_bytes", "Size of the LMDB map (sparse)."),
            ("map_used_bytes", "kithmail_core_map_used_bytes", "Bytes of the LMDB map in use."),
            ("readers", "kithmail_core_readers", "LMDB reader slots in use."),
        ):
            if key in st:
                yield GaugeMetricFamily(name, text, value=st[key])

    def _quarantine(self) -> Iterator[Metric]:
        if self.quarantine is None:
            return
        try:
            rows = self.quarantine()
        except Exception:
            return
        copies = GaugeMetricFamily(
            "kithmail_quarantine_messages",
            "Copies held in quarantine, by the layer that held them.",
            labels=["layer"],
        )
        size = GaugeMetricFamily(
            "kithmail_quarantine_bytes",
            "Bytes held in quarantine (each copy counted), by the layer that held them.",
            labels=["layer"],
        )
        seen = set()
        for layer, n, b in rows:
            seen.add(layer)
            copies.add_metric([layer], n)
            size.add_metric([layer], b)
        for layer in ("community",):  # present even when nothing is held
            if layer not in seen:
                copies.add_metric([layer], 0)
                size.add_metric([layer], 0)
        yield copies
        yield size

    def _disk(self) -> Iterator[Metric]:
        if self.spool_dir is None:
            return
        try:
            st = os.statvfs(self.spool_dir)
        except OSError:
            return
        yield GaugeMetricFamily(
            "kithmail_spool_filesystem_avail_bytes",
            "Free bytes, for unprivileged use, on the spool's filesystem.",
            value=st.f_bavail * st.f_frsize,
        )
        yield GaugeMetricFamily(
            "kithmail_spool_filesystem_size_bytes",
            "Size of the spool's filesystem.",
            value=st.f_blocks * st.f_frsize,
        )
        yield GaugeMetricFamily(
            "kithmail_spool_filesystem_avail_inodes",
            "Free inodes on the spool's filesystem (one spool file per message).",
            value=st.f_favail,
        )


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


def _proc_stat(pid: int) -> list[bytes]:
    """/proc/PID/stat's fields after the command name (field 3 onwards)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    return raw[raw.rfind(b")") + 2 :].split()


def _children(parent: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if int(_proc_stat(int(entry))[1]) == parent:
                out.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(out)


class WorkerProcessCollector(Collector):
    """Prometheus's standard process_* metrics for every process of a multi-worker server.

    prometheus-client's multiprocess mode collects none of them, so this
    reads /proc on scrape: the supervising process (`worker="main"`) and
    its children in fork order (`worker="0"`, `"1"`, ...: bounded by
    `[server] workers`). Dashboards sum over `worker`; a single-process
    server exports the same names without the label.
    """

    def __init__(self, supervisor: int) -> None:
        self.supervisor = supervisor

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        fams: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "cpu": CounterMetricFamily(
                "process_cpu_seconds", "User and system CPU time.", labels=["worker"]
            ),
            "rss": GaugeMetricFamily(
                "process_resident_memory_bytes", "Resident memory size.", labels=["worker"]
            ),
            "vms": GaugeMetricFamily(
                "process_virtual_memory_bytes", "Virtual memory size.", labels=["worker"]
            ),
            "start": GaugeMetricFamily(
                "process_start_time_seconds",
                "Start time of the process since the epoch.",
                labels=["worker"],
            ),
            "fds": GaugeMetricFamily(
                "process_open_fds", "Open file descriptors.", labels=["worker"]
            ),
        }
        try:
            boot = _boot_time()
        except OSError:  # /proc/stat hidden (a sandbox): start times only are lost
            boot = 0.0
        try:
            pids = [("main", self.supervisor)] + [
                (str(i), pid) for i, pid in enumerate(_children(self.supervisor))
            ]
        except OSError:
            return
        for label, pid in pids:
            try:
                f = _proc_stat(pid)
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, IndexError):
                continue
            fams["cpu"].add_metric([label], (int(f[11]) + int(f[12])) / _TICKS)
            fams["vms"].add_metric([label], int(f[20]))
            fams["rss"].add_metric([label], int(f[21]) * _PAGE)
            if boot:
                fams["start"].add_metric([label], boot + int(f[19]) / _TICKS)
            fams["fds"].add_metric([label], fds)
        yield from fams.values()


def render(
    *, multiprocess: bool, extra: Sequence[Collector] = (), supervisor: int | None = None
) -> bytes:
    """The /metrics page: this process's (or every worker's merged) metrics, then `extra`."""
    from prometheus_client import generate_latest

    if multiprocess:
        registry = CollectorRegistry()
        prom_mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        if supervisor is not None:
            registry.register(WorkerProcessCollector(supervisor))
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    if extra:
        more = CollectorRegistry(auto_describe=False)
        for c in extra:
            more.register(c)
        body += generate_latest(more)
    return body
