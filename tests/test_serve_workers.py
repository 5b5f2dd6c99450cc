"""`kith serve` with several workers: they stand or fall together, and say why.

A worker that fails or dies used to vanish without a word (its error was
lost to `os._exit`) while the parent went on waiting for the others: a
server with no worker 0 accepts mail but never delivers it and serves no
web UI, and a test saw only "worker 0 never became ready".
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from gateway import KITH, Gateway, make_gateway, message, run, running_gateway, send


def _serve_until_it_exits(gw: Gateway) -> subprocess.CompletedProcess[str]:
    """`kith serve`, expected to give up on its own; killed (workers too) if it does not."""
    proc = subprocess.Popen(
        [str(KITH), "serve", "-c", str(gw.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"kith serve kept running:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_worker_that_cannot_listen_says_why_and_the_server_exits(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path / "gw", sections={"server": {"workers": 2}})
    with socket.socket() as taken:  # another program holds the submission port
        taken.bind(("127.0.0.1", gw.submission_port))
        taken.listen()
        done = _serve_until_it_exits(gw)
    assert done.returncode != 0
    assert f"('127.0.0.1', {gw.submission_port}): address already in use" in done.stderr, (
        done.stderr[-3000:]
    )
    assert re.search(r"worker [01] \(pid \d+\) failed", done.stderr), done.stderr[-3000:]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_web_port_in_use_stops_the_start_and_says_which(tmp_path: Path, workers: int) -> None:
    """The web listener was bound in a task: its error went unseen and the log said it served."""
    gw = make_gateway(tmp_path / "gw", sections={"server": {"workers": workers}})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", gw.web_port))
        taken.listen()
        done = _serve_until_it_exits(gw)
    assert done.returncode != 0
    assert f"127.0.0.1:{gw.web_port}: Address already in use" in done.stderr, done.stderr[-3000:]
    assert "web UI, API and /metrics on" not in done.stderr


def test_when_worker_0_dies_the_others_stop_and_the_status_says_so(tmp_path: Path) -> None:
    with running_gateway(tmp_path / "gw", sections={"server": {"workers": 2}}) as gw:
        gw.wait_for("both workers", lambda: gw.log_text().count("kithmail ready") == 2)
        # Worker 0 is the one serving the web listener.
        m = re.search(r"web UI, API and /metrics on \S+ \(pid (\d+)\)", gw.log_text())
        assert m, gw.log_text()
        worker0 = int(m[1])
        os.kill(worker0, signal.SIGKILL)  # as the OOM killer would
        assert gw.proc is not None
        status = gw.proc.wait(timeout=60)
        assert status != 0
        log = gw.log_text()
        assert f"worker 0 (pid {worker0}) was killed by SIGKILL; stopping the other workers" in log
        (other,) = {int(p) for p in re.findall(r"kithmail ready \(pid (\d+)\)", log)} - {worker0}
        assert f"kithmail stopping (pid {other})" in log


def test_two_workers_count_the_digests_they_send_on_metrics(tmp_path: Path) -> None:
    """A counter made before the fork (at import, in the parent) was missing from /metrics."""
    sections = {
        "server": {"workers": 2},
        "recon": {"exempt_networks": ["127.0.0.0/24"]},
        "community": {"mode": "enforce", "sav": False},  # an unknown sender is held
        "digest": {"enabled": True},
    }
    with running_gateway(tmp_path / "gw", sections=sections) as gw:
        gw.wait_for("both workers", lambda: gw.log_text().count("kithmail ready") == 2)
        r = run(send(gw.port, "127.0.0.70", "eve@remote.test", ["ann@example.test"], message()))
        assert r[-1].code == 250, r
        gw.wait_for(
            "the held copy",
            lambda: gw.kith("quarantine", "list", "ann@example.test").stdout.strip(),
        )
        gw.advance(86400.0)
        gw.wait_for(
            "ann's digest",
            lambda: any(
                b"Auto-Submitted: auto-generated" in m for m in gw.messages("ann@example.test")
            ),
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.web_port}/metrics", timeout=10) as page:
            text = page.read().decode()
        assert "kithmail_digests_sent_total 1.0" in text.splitlines(), text[-3000:]
        assert "kithmail_digest_failures_total 0.0" in text.splitlines()
