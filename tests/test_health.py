"""/healthz and /readyz as a load balancer sees them, on a real `kith serve`.

The spool lives on a tmpfs of its own (tests/disk.py), so that "not
writable" is a real read-only remount (root ignores chmod) and "full" is a
real full filesystem. A downstream that is down is not unreadiness: the
gateway keeps accepting and queueing, and the queue metrics say so.
"""

from __future__ import annotations

import contextlib
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from disk import tmpfs
from gateway import Gateway, free_port, run, running_gateway, send
from prometheus_server import scrape


def _get(gw: Gateway, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.web_port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _remount(d: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(d)], check=True)


def test_readyz_follows_the_spool_filesystem(tmp_path: Path) -> None:
    root = tmp_path / "gw"
    with tmpfs(root / "var" / "spool", "size=4m") as spool, running_gateway(root) as gw:
        assert _get(gw, "/healthz") == (200, "ok\n")
        assert _get(gw, "/readyz") == (200, "ready\n")

        # Read-only: not ready, with the reason; the process is still up.
        _remount(spool, "ro")
        try:
            status, body = _get(gw, "/readyz")
            assert status == 503, body
            assert body.splitlines()[0] == "not ready"
            assert "spool not writable: Read-only file system" in body
            assert _get(gw, "/healthz") == (200, "ok\n")
        finally:
            _remount(spool, "rw")
        assert _get(gw, "/readyz") == (200, "ready\n")

        # Full: every message would get 452 here, so not ready either.
        filler = spool / "filler"
        with filler.open("wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        status, body = _get(gw, "/readyz")
        assert status == 503 and "spool full: 0 bytes free" in body, body
        r = run(send(gw.port, "127.0.0.1", "bob@remote.test", ["ann@example.test"]))
        assert r[-1].code == 452, r
        filler.unlink()
        assert _get(gw, "/readyz") == (200, "ready\n")


def test_a_downstream_outage_is_a_metric_not_unreadiness(tmp_path: Path) -> None:
    down = f"smtp://127.0.0.1:{free_port()}"  # nothing listens there
    with running_gateway(tmp_path / "gw", sections={"domains": {"downstream": down}}) as gw:
        r = run(send(gw.port, "127.0.0.1", "bob@remote.test", ["ann@example.test"]))
        assert r[-1].code == 250, r
        gw.wait_for(
            "a deferred delivery attempt",
            lambda: (
                scrape(gw.web_port).value("kithmail_delivery_attempts_total", result="deferred")
                >= 1
            ),
        )
        # The queue's gauges follow its scan of the spool (every 0.5 s).
        gw.wait_for("one queued", lambda: scrape(gw.web_port).value("kithmail_queue_messages") == 1)
        page = scrape(gw.web_port)
        assert page.value("kithmail_queue_oldest_seconds") >= 0
        assert page.value("kithmail_delivery_attempts_total", result="delivered") == 0
        assert _get(gw, "/readyz") == (200, "ready\n")
        # Still taking mail.
        r = run(send(gw.port, "127.0.0.1", "bob@remote.test", ["bob@example.test"]))
        assert r[-1].code == 250, r
        gw.wait_for("two queued", lambda: scrape(gw.web_port).value("kithmail_queue_messages") == 2)
