"""Upgrades as docs/upgrade.md promises them: schemas migrate forward by themselves, never back.

A database left by an older kithmail (schema 1 here) is migrated when `kith
serve` starts, in one transaction; a database written by a newer kithmail
makes this one refuse to start, with one line that says so and what to do.
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

from gateway import KITH, make_gateway, run, send

from kithmail.db import MIGRATIONS


def _version(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def test_an_older_schema_migrates_forward_at_start(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path / "gw", users=())
    db = gw.data_dir / "kithmail.db"
    for p in gw.data_dir.glob("kithmail.db*"):
        p.unlink()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode = WAL")
    MIGRATIONS[0](conn)
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    assert _version(db) == 1
    gw.start()
    try:
        assert _version(db) == len(MIGRATIONS)
        gw.kith("user", "add", "ann@example.test")
        r = run(send(gw.port, "127.0.0.1", "bob@remote.test", ["ann@example.test"]))
        assert r[-1].code == 250, r
    finally:
        gw.stop()
        gw.kill()


def test_a_newer_schema_refuses_to_start_this_kithmail(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path / "gw")
    db = gw.data_dir / "kithmail.db"
    newer = len(MIGRATIONS) + 1
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {newer}")
    r = subprocess.run(
        [str(KITH), "serve", "-c", str(gw.config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"kith: error: {db} has schema {newer}, this kithmail knows up to "
        f"{len(MIGRATIONS)}: upgrade kithmail"
    )
    assert _version(db) == newer  # untouched
