"""The Prometheus metrics of a kithmail process, and their /metrics endpoint.

Names follow Prometheus conventions: `kithmail_` prefix, base units
(seconds), `_total` counters, and label values from closed sets only (a
layer, an action, a front end, a result) — never an address or an IP.

With several worker processes, each worker records into prometheus-client's
multiprocess files under `<data_dir>/metrics` and the supervising process
serves the merged view; set up by `multiprocess_dir` before any worker
creates a metric.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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

__all__ = ["Metrics", "SmtpMetrics", "multiprocess_dir", "serve_metrics"]

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
            "SMTP replies sent, by command and reply code.",
            ["command", "code"],
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
        self.replies.labels(command, str(code)).inc()


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
        registry = CollectorRegistry()
        prom_mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        start_http_server(int(port), host.strip("[]"), registry=registry)
    else:
        start_http_server(int(port), host.strip("[]"))
