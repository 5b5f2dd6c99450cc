"""docs/backup.md's procedure, run as written against a running `kith serve`, then restored.

While the gateway runs: the database is copied with `sqlite3 .backup`, the
spool with `rsync`; the core during a short stop (`cp -a --sparse=always`).
Then everything in data_dir is lost, the copies are put back, and the
gateway must start with the same users, the same community, the same held
mail — and the mail that was still queued gets delivered.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from gateway import free_port, message, run, running_gateway, send

ANN = "ann@example.test"


def _sh(*args: str) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, f"{args}: {r.stdout}{r.stderr}"
    return r.stdout


def test_backup_while_running_and_restore(tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    backup.mkdir()
    down_port = free_port()  # nothing listens: the queued message stays queued
    sections = {
        "community": {"mode": "enforce"},
        "domains": {"downstream": f"smtp://127.0.0.1:{down_port}"},
    }
    with running_gateway(tmp_path / "gw", sections=sections) as gw:
        d = gw.data_dir
        gw.kith("community", "add", ANN, "friend@remote.test")
        # Two held (no DNS here: no sender is authenticated); one is then
        # released, and stays queued (the downstream is down).
        for subject in ("held", "queued"):
            r = run(send(gw.port, "127.0.0.1", "pat@remote.test", [ANN], message(subject)))
            assert r[-1].code == 250, r
        held = json.loads(gw.kith("quarantine", "list", "--json", ANN).stdout)
        (released,) = [h["queue_id"] for h in held if h["subject"] == "queued"]
        gw.kith("quarantine", "release", released, "0")
        gw.wait_for("a deferred attempt", lambda: "state=deferred" in gw.log_text())

        # 1. The database, online.
        _sh("sqlite3", str(d / "kithmail.db"), f".backup '{backup / 'kithmail.db'}'")
        assert _sh("sqlite3", str(backup / "kithmail.db"), "PRAGMA integrity_check").strip() == "ok"
        # 2. The spool and the key files, file by file.
        _sh("rsync", "-a", "--exclude", "tmp/", f"{d / 'spool'}/", f"{backup / 'spool'}/")
        _sh(
            "rsync",
            "-a",
            "--exclude",
            "kithmail.db*",
            "--exclude",
            "core/",
            "--exclude",
            "spool/",
            "--exclude",
            "metrics/",
            "--exclude",
            "mail/",
            f"{d}/",
            f"{backup / 'files'}/",
        )
        # 3. The core, during a short stop.
        gw.stop()
        _sh("cp", "-a", "--sparse=always", str(d / "core"), str(backup / "core"))
        gw.start()

        # Disaster: everything but the Maildirs is gone.
        gw.stop()
        for p in d.iterdir():
            if p.name != "mail":
                shutil.rmtree(p) if p.is_dir() else p.unlink()

        # Restore.
        _sh("cp", "-a", str(backup / "kithmail.db"), str(d / "kithmail.db"))
        _sh("cp", "-a", "--sparse=always", str(backup / "core"), str(d / "core"))
        _sh("cp", "-a", str(backup / "spool"), str(d / "spool"))
        _sh("cp", "-a", f"{backup / 'files'}/.", f"{d}/")
        gw.start()

        assert ANN in gw.kith("user", "list").stdout
        assert "friend@remote.test" in gw.kith("community", "list", ANN).stdout
        held = json.loads(gw.kith("quarantine", "list", "--json", ANN).stdout)
        assert [h["subject"] for h in held] == ["held"], held
        assert "kithmail ready" in gw.log_text()
        queued = gw.kith("queue", "list").stdout
        assert released in queued, queued
