"""`kith policy` as an operator runs it: a process, workers, SIGTERM."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ports import free_port

import kithmail

KITH = Path(sys.executable).parent / "kith"


def ask(port: int, client: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            (
                "request=smtpd_access_policy\nprotocol_state=RCPT\n"
                f"client_address={client}\nsender=a@b.example\nrecipient=ann@example.test\n\n"
            ).encode()
        )
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = s.recv(4096)
            assert chunk, "closed without an answer"
            data += chunk
        return data.decode()


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, "kith policy exited at start"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            # Not listening yet: pace on the process itself, not a guessed sleep.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)
    raise AssertionError("kith policy did not listen")


def test_two_workers_share_the_port_and_stop_cleanly(tmp_path: Path) -> None:
    port, web = free_port(), free_port()
    data = tmp_path / "var"
    cfg = tmp_path / "kithmail.toml"
    cfg.write_text(
        f'[server]\ndata_dir = "{data}"\nworkers = 2\n'
        f'listeners = {{ policy = ["127.0.0.1:{port}"], web = ["127.0.0.1:{web}"] }}\n'
        '[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "200ms"\n'
    )
    log = tmp_path / "policy.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([str(KITH), "policy", "-c", str(cfg)], stderr=err)
        try:
            wait_listening(port, proc)
            answers = [ask(port, f"198.51.100.{i}") for i in range(1, 41)]
            with urllib.request.urlopen(f"http://127.0.0.1:{web}/metrics", timeout=5) as r:
                metrics = r.read().decode()
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=15)
    assert code == 0
    assert all(a.startswith("action=DEFER_IF_PERMIT 4.7.1 ") for a in answers)
    # /metrics merges both workers' counts.
    want = (
        'kithmail_verdicts_total{action="defer",frontend="policy",layer="recon",shadow="no"} 40.0'
    )
    assert want in metrics, metrics[-3000:]
    assert 'kithmail_policy_requests_total{result="answered"} 40.0' in metrics
    text = log.read_text()
    deciders = set(re.findall(r"kithmail\.policy\[(\d+)\] policy client=", text))
    assert len(deciders) == 2, f"both workers answered: {text[-2000:]}"
    # Each worker flushed its Recon sightings at SIGTERM: all 40 are remembered.
    core = kithmail.Core(str(data / "core"), ipv4_prefix=None, ipv6_prefix=None)
    assert len(core.recon) == 40
    core.close()
