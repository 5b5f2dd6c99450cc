"""`kith backup` of a running gateway under load, then a restore (docs/backup.md).

While `kith serve` runs and a client keeps sending, `kith backup DEST`
copies data_dir. The copy must be consistent on its own (the core opens,
the database passes `PRAGMA integrity_check`, no spool file is torn); then
data_dir is lost, the backup is put in its place as docs/backup.md says,
and the gateway must start with the same users, community, Recon passes,
held mail and queued mail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from disk import tmpfs
from gateway import KITH, Gateway, free_port, message, run, running_gateway, send

from kithmail import Core, InvalidInputError
from kithmail.db import Database
from kithmail.spool import Envelope, Outcome, Recipient, Spool, State

ANN = "ann@example.test"
PASSED = "127.0.0.5"  # a source that passes Recon before the backup
NEVER = "127.0.0.9"  # a source never seen


class Sender(threading.Thread):
    """Sends held mail to ann from a trusted address until stopped, one at a time."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.accepted: list[tuple[float, float, str]] = []  # (start, end, subject)
        self.failed: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            subject = f"load {n}"
            start = time.monotonic()
            try:
                r = run(send(self.port, "127.0.0.1", "pat@remote.test", [ANN], message(subject)))
            except Exception as e:  # reported by the test
                self.failed.append(f"{subject}: {e!r}")
                continue
            if r[-1].code == 250:
                self.accepted.append((start, time.monotonic(), subject))
            else:
                self.failed.append(f"{subject}: {r[-1]}")


def _held_subjects(gw: Gateway) -> list[str]:
    out = gw.kith("quarantine", "list", "--json", "--limit", "500", ANN).stdout
    return sorted(h["subject"] for h in json.loads(out))


def test_backup_under_load_then_restore(tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    down_port = free_port()  # nothing listens: a released message stays queued
    sections = {
        "community": {"mode": "enforce"},
        "domains": {"downstream": f"smtp://127.0.0.1:{down_port}"},
    }
    with running_gateway(tmp_path / "gw", sections=sections) as gw:
        d = gw.data_dir
        gw.kith("community", "add", ANN, "friend@remote.test")
        gw.kith("dkim", "keygen", "example.test")
        # Held mail (no DNS here, so no sender is authenticated), one of
        # which is released and stays queued (the downstream is down).
        for subject in ("held", "queued"):
            r = run(send(gw.port, "127.0.0.1", "pat@remote.test", [ANN], message(subject)))
            assert r[-1].code == 250, r
        held = json.loads(gw.kith("quarantine", "list", "--json", ANN).stdout)
        (released,) = [h["queue_id"] for h in held if h["subject"] == "queued"]
        gw.kith("quarantine", "release", released, "0")
        gw.wait_for("a deferred attempt", lambda: "state=deferred" in gw.log_text())
        # A source that passes Recon: deferred, then retried after min_delay.
        r = run(send(gw.port, PASSED, "pat@remote.test", [ANN], message("recon")))
        assert (r[-1].code, r[-1].status) == (451, "4.7.1"), r
        gw.advance(3)
        r = run(send(gw.port, PASSED, "pat@remote.test", [ANN], message("recon")))
        assert r[-1].code == 250, r
        # The pass is group-committed within 100 ms; another process sees it then.
        gw.wait_for(
            "the Recon pass committed",
            lambda: re.search(r"^passes +1$", gw.kith("recon", "show", PASSED).stdout, re.M),
        )
        dkim_keys = {p.name: p.read_bytes() for p in (d / "dkim").iterdir()}
        sav_key = (d / "sav.key").read_bytes() if (d / "sav.key").exists() else None

        # The backup, while a client keeps sending.
        sender = Sender(gw.port)
        sender.start()
        gw.wait_for("mail under load", lambda: len(sender.accepted) >= 2)
        t0 = time.monotonic()
        done = subprocess.run(
            [str(KITH), "-c", str(gw.config), "backup", str(backup)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        t1 = time.monotonic()
        gw.wait_for("mail after the backup", lambda: any(s > t1 for s, _, _ in sender.accepted))
        sender.stop.set()
        sender.join(timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
        # The backup's time and size, for the record.
        print(f"{done.stdout}kith backup ran {t1 - t0:.2f} s, interpreter start included")
        assert not sender.failed, sender.failed
        # A message was in flight while the backup ran.
        assert any(s < t1 and e > t0 for s, e, _ in sender.accepted), (t0, t1, sender.accepted)
        before = {subj for _, e, subj in sender.accepted if e < t0}
        assert before

    # The copy is consistent by itself.
    manifest = json.loads((backup / "kithmail-backup.json").read_text())
    assert manifest["messages"] >= len(before) + 2
    assert "test-clock" in manifest["not_copied"]
    assert {"dkim/", "tls/"} <= set(manifest["copied"])
    with sqlite3.connect(backup / "kithmail.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    core = Core(str(backup / "core"), ipv4_prefix=None, ipv6_prefix=None)
    try:
        assert core.community.member(ANN, "friend@remote.test").status == "allowed"
    finally:
        core.close()

    # Disaster: data_dir is lost. Restore as docs/backup.md says: the backup
    # in place of data_dir (and a Maildir under it, which is not in a backup,
    # moved back).
    broken = d.with_name("var.broken")
    d.rename(broken)
    subprocess.run(["cp", "-a", str(backup), str(d)], check=True, timeout=60)
    (d / "kithmail-backup.json").unlink()
    if (broken / "mail").is_dir():
        (broken / "mail").rename(d / "mail")
    shutil.rmtree(broken)
    gw.start()
    try:
        gw.advance(0)  # the test clock where it was (test-clock is not backed up)
        assert "damaged" not in gw.log_text()
        assert not any((d / "spool" / "corrupt").iterdir())
        users = gw.kith("user", "list").stdout
        assert ANN in users and "bob@example.test" in users
        assert "friend@remote.test" in gw.kith("community", "list", ANN).stdout
        subjects = _held_subjects(gw)
        assert {"held", "recon"} <= set(subjects)
        assert "queued" not in subjects
        assert before <= set(subjects), before - set(subjects)
        queued = gw.kith("queue", "list").stdout
        assert released in queued, queued
        assert {p.name: p.read_bytes() for p in (d / "dkim").iterdir()} == dkim_keys
        if sav_key is not None:
            assert (d / "sav.key").read_bytes() == sav_key
        # The passed source is not deferred again; a new one still is.
        r = run(send(gw.port, PASSED, "pat@remote.test", [ANN], message("again")))
        assert r[-1].code == 250, r
        r = run(send(gw.port, NEVER, "pat@remote.test", [ANN], message("new")))
        assert (r[-1].code, r[-1].status) == (451, "4.7.1"), r
    finally:
        gw.stop()
        gw.kill()


def test_backup_refuses_a_bad_target_and_says_why(tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir()
    env = {**os.environ, "KITHMAIL_DATA_DIR": str(data)}

    def kith(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(KITH), *args], capture_output=True, text=True, timeout=60, check=False, env=env
        )

    r = kith("backup", str(tmp_path / "b1"))
    assert r.returncode == 1
    assert "is not a kithmail data_dir (no kithmail.db, core/data.mdb)" in r.stderr
    assert not (tmp_path / "b1").exists()

    Database.open(data / "kithmail.db").close()
    Core(str(data / "core")).close()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("mine")
    r = kith("backup", str(full))
    assert r.returncode == 1 and "is not empty" in r.stderr, r.stderr
    assert [p.name for p in full.iterdir()] == ["keep"]
    r = kith("backup", str(data / "inside"))
    assert r.returncode == 1 and "is inside the data_dir" in r.stderr, r.stderr
    assert not (data / "inside").exists()
    r = kith("backup", str(tmp_path / "no" / "such"))
    assert r.returncode == 1 and "does not exist" in r.stderr, r.stderr

    # An empty directory is fine, and gets the data_dir's layout.
    empty = tmp_path / "empty"
    empty.mkdir()
    r = kith("backup", str(empty))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in empty.iterdir()) == [
        "core",
        "kithmail-backup.json",
        "kithmail.db",
        "spool",
    ]


def test_core_copy_to_refuses_a_used_target_and_the_copy_opens(tmp_path: Path) -> None:
    core = Core(str(tmp_path / "core"), ipv4_prefix=24)
    try:
        core.community.add(ANN, "friend@remote.test", "allow", "manual", 1)
        (tmp_path / "used").mkdir()
        (tmp_path / "used" / "data.mdb").write_bytes(b"not ours to overwrite")
        with pytest.raises(InvalidInputError, match="is not empty"):
            core.copy_to(str(tmp_path / "used"))
        assert (tmp_path / "used" / "data.mdb").read_bytes() == b"not ours to overwrite"
        with pytest.raises(ValueError, match="not a directory"):
            core.copy_to(str(tmp_path / "used" / "data.mdb"))
        core.copy_to(str(tmp_path / "copy"))
        core.community.add(ANN, "late@remote.test", "allow", "manual", 2)
    finally:
        core.close()
    assert [p.name for p in (tmp_path / "copy").iterdir()] == ["data.mdb"]
    copy = Core(str(tmp_path / "copy"), ipv4_prefix=None, ipv6_prefix=None)
    try:
        assert copy.stats()["ipv4_prefix"] == 24
        assert copy.community.member(ANN, "friend@remote.test").status == "allowed"
        assert copy.community.member(ANN, "late@remote.test").status == "unknown"
    finally:
        copy.close()


def test_backup_to_another_filesystem_copies_and_a_full_one_fails_clean(tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir()
    Database.open(data / "kithmail.db").close()
    Core(str(data / "core")).close()
    spool = Spool(data / "spool")
    envelope = Envelope(
        received=1.0,
        client_ip="192.0.2.1",
        helo="client.example",
        mail_from="pat@remote.test",
        recipients=(Recipient(ANN, Outcome.QUARANTINE), Recipient(ANN, Outcome.DELIVER)),
    )
    qid = spool.accept_sync(envelope, message("across"))
    spool.mark_sync(qid, 1, State.DELIVERED)
    env = {**os.environ, "KITHMAIL_DATA_DIR": str(data)}

    def backup(dest: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(KITH), "backup", str(dest)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )

    # Another filesystem: no hard link is possible, the message is copied.
    with tmpfs(tmp_path / "other", "size=8m") as other:
        r = backup(other / "b")
        assert r.returncode == 0, r.stderr
        assert "spool: 1 messages" in r.stdout and "hard-linked" not in r.stdout, r.stdout
        copied = Spool(other / "b" / "spool").load_sync(qid)
        assert copied.read_bytes() == message("across")
        assert [s.state for s in copied.recipients] == [State.HELD, State.DELIVERED]
    # A full one: the copy fails, says so, and leaves nothing behind.
    with tmpfs(tmp_path / "small", "size=16k") as small:
        r = backup(small)
        assert r.returncode == 1, r.stdout
        assert r.stderr.startswith(f"kith: error: backup failed, nothing left in {small}: "), (
            r.stderr
        )
        assert list(small.iterdir()) == []
