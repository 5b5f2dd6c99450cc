"""A real Prometheus for tests, and a small reader of /metrics pages.

`prometheus_server(directory, targets)` starts Debian's `prometheus` on a
free loopback port, scraping each "127.0.0.1:PORT" target's /metrics every
second, with its storage under `directory`; it waits until `/-/ready`
answers and stops the server on exit. `Prometheus.query(expr)` asks the
HTTP API (`/api/v1/query`); `Prometheus.wait(expr, ok)` polls it until the
answer satisfies `ok` (the first sample appears only after a few seconds,
whatever the interval: REAL-PARTS.md).

`scrape(port)` reads a kithmail /metrics page; `Samples` looks values up by
name and labels, summing over the labels not given.

`make test` installs prometheus (DEB_PACKAGES); by hand: `apt-get install
-y --no-install-recommends prometheus` (promtool comes with it). Its
package scripts start no service here.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ports import free_port
from prometheus_client.parser import text_string_to_metric_families

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"


def _free_port() -> int:
    return free_port()


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


# ---------------------------------------------------------------- reading /metrics


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


class Samples:
    """Every sample of one /metrics page."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[Sample] = []
        self.families: dict[str, str] = {}  # family name -> type
        for fam in text_string_to_metric_families(text):
            self.families[fam.name] = fam.type
            for s in fam.samples:
                self.samples.append(Sample(s.name, dict(s.labels), float(s.value)))

    def names(self) -> set[str]:
        return {s.name for s in self.samples}

    def find(self, name: str, **labels: str) -> list[Sample]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the matching samples; 0 when there is none."""
        return sum(s.value for s in self.find(name, **labels))

    def has(self, name: str, **labels: str) -> bool:
        return bool(self.find(name, **labels))


def scrape(port: int) -> Samples:
    status, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, f"/metrics answered {status}: {body[:500]}"
    return Samples(body)


# ---------------------------------------------------------------- a real Prometheus


@dataclass
class Prometheus:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of `expr` now: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        status, body = _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", f"{expr}: {body[:500]}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def values(self, expr: str) -> list[float]:
        return [float(r["value"][1]) for r in self.query(expr)]

    def wait(
        self, expr: str, ok: Callable[[list[float]], bool], timeout: float = 30.0
    ) -> list[float]:
        """Poll `expr` until `ok(values)`; fail with the last answer and the log."""
        deadline = time.monotonic() + timeout
        last: list[float] = []
        while time.monotonic() < deadline:
            last = self.values(expr)
            if ok(last):
                return last
            time.sleep(0.25)
        raise AssertionError(
            f"Prometheus: {expr} is {last} after {timeout}s; its log ends:\n"
            + "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
        )

    def targets_up(self) -> list[dict[str, Any]]:
        _, body = _get(f"{self.url}/api/v1/targets")
        active: list[dict[str, Any]] = json.loads(body)["data"]["activeTargets"]
        return active


def write_config(directory: Path, targets: Sequence[str], *, rules: Sequence[Path] = ()) -> Path:
    cfg = directory / "prometheus.yml"
    lines = [
        "global:",
        "  scrape_interval: 1s",
        "  evaluation_interval: 1s",
    ]
    if rules:
        lines.append("rule_files:")
        lines += [f"  - {json.dumps(str(r))}" for r in rules]
    lines += [
        "scrape_configs:",
        "  - job_name: kithmail",
        "    scrape_interval: 1s",
        "    scrape_timeout: 1s",
        "    static_configs:",
        "      - targets: [" + ", ".join(json.dumps(t) for t in targets) + "]",
    ]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


@contextlib.contextmanager
def prometheus_server(
    directory: Path, targets: Sequence[str], *, rules: Sequence[Path] = ()
) -> Iterator[Prometheus]:
    if shutil.which(PROMETHEUS) is None:
        raise RuntimeError(
            "prometheus is not installed: apt-get install -y --no-install-recommends prometheus"
        )
    directory.mkdir(parents=True, exist_ok=True)
    cfg = write_config(directory, targets, rules=rules)
    log = directory / "prometheus.log"
    for attempt in range(3):
        port = _free_port()
        out = log.open("ab")
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        server = Prometheus(port, proc, log)
        deadline = time.monotonic() + 20
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                if _get(f"{server.url}/-/ready", timeout=1)[0] == 200:
                    ready = True
                    break
            time.sleep(0.05)
        if ready:
            break
        proc.kill()
        proc.wait()
        if attempt == 2:
            raise RuntimeError(f"prometheus did not start:\n{log.read_text(errors='replace')}")
    try:
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
