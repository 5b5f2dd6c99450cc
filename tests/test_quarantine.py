"""The quarantine (kithmail.quarantine) over a real spool and a real database, and its CLI.

Every message is accepted into a spool under the test's tmp_path exactly as
the SMTP listener does (an `Envelope` whose recipients carry their
outcomes and verdicts), and the index is the real SQLite file. The crash
between accept and index is a real `kill -9` of a child process that has
just accepted; time is a clock the test moves. `kith quarantine` runs as a
subprocess over the same data directory.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from kithmail import Core, config
from kithmail.db import Database
from kithmail.layers import Action, Layer, Verdict
from kithmail.quarantine import (
    DAY,
    AdminOnlyError,
    NotHeldError,
    NotLocalError,
    Quarantine,
    QuarantineError,
    reserve_for,
    sender_identity,
)
from kithmail.spool import (
    Envelope,
    MessageNotFoundError,
    Outcome,
    Recipient,
    Spool,
    SpoolFullError,
    State,
)
from kithmail.tenants import Policies

KITH = Path(sys.executable).parent / "kith"
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
T0 = 1_700_000_000.0
DAYS = 2
ANN, BOB = "ann@example.test", "bob@example.test"

UNKNOWN = Verdict(
    Layer.COMMUNITY, Action.QUARANTINE, "community.unknown", "unknown: pat@example.com ..."
)
VIRUS = Verdict(Layer.ANTIVIRUS, Action.QUARANTINE, "antivirus.virus", "Eicar-Signature")
DKIM_FAIL = Verdict(Layer.SPOOFING, Action.QUARANTINE, "dkim.fail", "broken DKIM signature")
MEMBER = Verdict(Layer.COMMUNITY, Action.ACCEPT, "community.member")


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def settings_for(data_dir: Path, days: int = DAYS, quota: int = 500 * 1024**2) -> config.Settings:
    return config.Settings(
        server=config.Server(data_dir=data_dir),
        domains=config.Domains(local=["example.test"]),
        community=config.Community(quarantine_days=days, quarantine_quota=quota),
    )


@dataclass
class World:
    data_dir: Path
    settings: config.Settings
    db: Database
    spool: Spool
    clock: Clock
    q: Quarantine

    def accept(
        self,
        *rcpts: tuple[str, Outcome, tuple[Verdict, ...]],
        sender: str = "pat@example.com",
        subject: str = "hello",
        received: float | None = None,
        body: bytes = b"body\r\n",
        extra: bytes = b"",
    ) -> str:
        env = Envelope(
            received=self.clock.t if received is None else received,
            client_ip="192.0.2.7",
            helo="mail.example.com",
            mail_from=sender,
            recipients=tuple(Recipient(a, o, vs) for a, o, vs in rcpts),
            tenant="default",
        )
        data = (
            b"Received: from mail.example.com\r\n"
            + f"From: Pat <{sender or 'mailer-daemon@example.com'}>\r\n".encode()
            + f"Subject: {subject}\r\n".encode()
            + b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
            + extra
            + b"\r\n"
            + body
        )
        return self.spool.accept_sync(env, data)

    def held(self, user: str = ANN, *verdicts: Verdict, **kw: object) -> str:
        qid = self.accept((user, Outcome.QUARANTINE, verdicts or (UNKNOWN,)), **kw)  # type: ignore[arg-type]
        self.q.index_sync(qid)
        return qid

    def state(self, qid: str, index: int = 0) -> State:
        return self.spool.load_sync(qid).recipients[index].state

    @staticmethod
    def core_member(core: Core, user: str, sender: str) -> str:
        return core.community.member(user, sender).status

    def audit(self) -> list[tuple[object, ...]]:
        return self.db.read("SELECT actor, action, target, detail FROM audit_log ORDER BY id")


def make_world(data_dir: Path, days: int = DAYS, quota: int = 500 * 1024**2) -> World:
    settings = settings_for(data_dir, days, quota)
    clock = Clock()
    database = Database.open(data_dir / "kithmail.db", clock=clock, hasher=FAST)
    database.sync_domains(settings.domains.local)
    spool = Spool(data_dir / "spool", clock=clock)
    q = Quarantine(database, spool, policies=Policies(settings, database.tenant_of), clock=clock)
    return World(data_dir, settings, database, spool, clock, q)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path / "var")
    w.db.add_user(ANN, password="correct horse")
    w.db.add_user(BOB, password="correct horse")
    yield w
    w.db.close()


# ---------------------------------------------------------------- the index


def test_index_writes_one_row_per_held_copy(world: World) -> None:
    qid = world.accept(
        ("Ann+News@Example.TEST", Outcome.QUARANTINE, (MEMBER, UNKNOWN)),
        (BOB, Outcome.DELIVER, (MEMBER,)),
        ("carol@example.test", Outcome.QUARANTINE, (DKIM_FAIL, VIRUS, UNKNOWN)),
        sender="Pat@Example.COM",
        subject="=?utf-8?q?Caf=C3=A9_menu?=",
    )
    assert world.q.index_sync(qid) == 2
    size = world.spool.load_sync(qid).size
    rows = world.q.held_sync(qid)
    assert [(h.rcpt_index, h.user, h.layer, h.reason) for h in rows] == [
        (0, ANN, "community", "community.unknown"),  # the +tag maps to its user
        # The anti-virus hold names the copy even though anti-spoofing held it first.
        (2, "carol@example.test", "antivirus", "antivirus.virus"),
    ]
    h = rows[0]
    assert (h.tenant, h.sender, h.from_addr) == ("default", "pat@example.com", "Pat@example.com")
    assert (h.subject, h.date, h.size) == ("Café menu", "Tue, 14 Nov 2023 22:13:20 +0000", size)
    assert (h.held_at, h.expires_at) == (int(T0), int(T0) + DAYS * DAY)
    assert h.detail == "unknown: pat@example.com ..."
    assert not h.admin_only and rows[1].admin_only
    # Idempotent, and the SAV module's note survives a refresh.
    with world.db.write() as conn:
        conn.execute("UPDATE quarantine SET sav = 'challenge sent' WHERE queue_id = ?", (qid,))
    assert world.q.index_sync(qid) == 2
    assert [x.sav for x in world.q.held_sync(qid)] == ["challenge sent"] * 2
    assert world.db.read("SELECT count(*) FROM quarantine") == [(2,)]


def test_subject_from_strangers_is_decoded_sanitised_and_bounded(world: World) -> None:
    # An encoded CR LF would start a new header line wherever the subject is shown.
    qid = world.held(subject="=?utf-8?q?a=0D=0AX-Evil:_1?=")
    assert world.q.held_sync(qid)[0].subject == "a X-Evil: 1"
    qid = world.held(subject="invoice \u202egpj.exe\u202c done")
    assert world.q.held_sync(qid)[0].subject == "invoice gpj.exe done"
    qid = world.held(subject="x" * 5000)
    s = world.q.held_sync(qid)[0].subject
    assert len(s) == 200 and s.endswith("…")
    qid = world.held(subject="=?bogus-charset?q?abc?=")
    assert world.q.held_sync(qid)[0].subject == "=?bogus-charset?q?abc?="


def test_index_of_a_message_with_nothing_held_writes_nothing(world: World) -> None:
    qid = world.accept((ANN, Outcome.DELIVER, (MEMBER,)))
    assert world.q.index_sync(qid) == 0
    assert world.q.held_sync(qid) == []


# ---------------------------------------------------------------- reconcile


CRASH = r"""
import os, signal, sys, time
from pathlib import Path
from kithmail.layers import Action, Layer, Verdict
from kithmail.spool import Envelope, Outcome, Recipient, Spool

v = Verdict(Layer.COMMUNITY, Action.QUARANTINE, "community.unknown", "unknown")
env = Envelope(received=time.time(), client_ip="192.0.2.7", helo="h.example.com",
               mail_from="pat@example.com", tenant="default",
               recipients=(Recipient("ann@example.test", Outcome.QUARANTINE, (v,)),))
qid = Spool(Path(sys.argv[1])).accept_sync(env, b"Subject: crash\r\n\r\nbody\r\n")
print(qid, flush=True)
# Accepted, and killed before the quarantine index was written.
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_reconcile_after_kill_between_accept_and_index(tmp_path: Path) -> None:
    w = make_world(tmp_path / "var")
    try:
        kept = w.held(subject="indexed before")
        gone = w.held(subject="released, then killed before the row went")
        # A release that crashed after the spool's mark: the row stayed.
        w.spool.mark_sync(gone, 0, State.PENDING, "released")
        done = subprocess.run(
            [sys.executable, "-c", CRASH, str(w.data_dir / "spool")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == -9, done.stderr
        crashed = done.stdout.strip()
        assert w.q.held_sync(crashed) == []
    finally:
        w.db.close()

    # The restart: a new process's spool, database and quarantine.
    w = make_world(tmp_path / "var")
    try:
        assert w.spool.recover_sync().pending == tuple(sorted((kept, gone, crashed)))
        r = w.q.reconcile_sync()
        assert (r.held, r.added, r.removed) == (2, 1, 1)
        listed = w.q.list_sync(ANN)
        assert sorted(h.queue_id for h in listed) == sorted([kept, crashed])
        assert [h.subject for h in listed if h.queue_id == crashed] == ["crash"]
        # Once: a second start finds nothing to do.
        r = w.q.reconcile_sync()
        assert (r.held, r.added, r.removed) == (2, 0, 0)
        assert w.q.count_sync(ANN) == 2
    finally:
        w.db.close()


def test_reconcile_drops_rows_of_messages_gone_from_the_spool(world: World) -> None:
    qid = world.held()
    world.spool.remove_sync(qid, force=True)
    assert world.q.reconcile_sync().removed == 1
    assert world.q.list_sync(ANN) == []


# ---------------------------------------------------------------- list and show


def test_list_search_and_paging(world: World) -> None:
    ids = []
    for n, (sender, subject) in enumerate(
        [
            ("pat@example.com", "lunch on friday"),
            ("news@shop.example", "50% off_everything"),
            ("pat@example.com", "re: lunch"),
            ("joe@example.net", "invoice 42"),
            ("news@shop.example", "last chance"),
        ]
    ):
        ids.append(world.held(sender=sender, subject=subject, received=T0 + n))
    world.held(BOB, subject="bob's own")
    newest_first = list(reversed(ids))
    assert [h.queue_id for h in world.q.list_sync(ANN)] == newest_first
    pages = [world.q.list_sync(ANN, limit=2, offset=o) for o in (0, 2, 4)]
    assert [[h.queue_id for h in p] for p in pages] == [
        newest_first[0:2],
        newest_first[2:4],
        newest_first[4:5],
    ]
    assert [h.subject for h in world.q.list_sync(ANN, sender="PAT@")] == [
        "re: lunch",
        "lunch on friday",
    ]
    assert [h.subject for h in world.q.list_sync(ANN, subject="LUNCH")] == [
        "re: lunch",
        "lunch on friday",
    ]
    # % and _ are text, not patterns.
    assert [h.subject for h in world.q.list_sync(ANN, subject="50% off_")] == ["50% off_everything"]
    assert world.q.list_sync(ANN, subject="%") == world.q.list_sync(ANN, subject="50%")
    assert [h.queue_id for h in world.q.list_sync(ANN, since=int(T0) + 3)] == newest_first[:2]
    assert world.q.count_sync(ANN) == 5
    assert world.q.count_sync(ANN, sender="shop.example") == 2
    assert [h.subject for h in world.q.list_sync(BOB)] == ["bob's own"]
    assert world.q.list_sync("nobody@example.test") == []
    with pytest.raises(ValueError):
        world.q.list_sync(ANN, limit=0)


def test_show_is_the_owner_s_only(world: World) -> None:
    qid = world.held(subject="for ann")
    s = world.q.show_sync(qid, 0)
    assert (s.recipient, s.mail_from, s.held.subject) == (ANN, "pat@example.com", "for ann")
    assert [v.reason for v in s.verdicts] == ["community.unknown"]
    assert "Subject: for ann\r\n" in s.headers and "body" not in s.headers
    assert world.q.show_sync(qid, 0, user=ANN) == s
    with pytest.raises(NotHeldError):
        world.q.show_sync(qid, 0, user=BOB)
    with pytest.raises(NotHeldError):
        world.q.show_sync(qid, 1)


# ---------------------------------------------------------------- release


def test_release_marks_pending_and_asks_the_queue(world: World) -> None:
    qid = world.accept(
        (ANN, Outcome.QUARANTINE, (UNKNOWN,)),
        (BOB, Outcome.DELIVER, (MEMBER,)),
    )
    world.q.index_sync(qid)
    h = world.q.release_sync(qid, 0, actor="web:ann@example.test", user=ANN)
    assert (h.queue_id, h.user) == (qid, ANN)
    msg = world.spool.load_sync(qid)
    assert msg.recipients[0].state is State.PENDING
    assert msg.recipients[0].detail == "released from quarantine by web:ann@example.test"
    # The same original recipient: nothing else in the envelope changed.
    assert [r.recipient.address for r in msg.recipients] == [ANN, BOB]
    flush = list((world.data_dir / "spool" / "flush").iterdir())
    assert [p.name.partition(".")[0] for p in flush] == [qid]
    assert world.spool.take_flush_requests_sync() == [qid]
    assert world.q.list_sync(ANN) == []
    assert world.audit() == [
        (
            "web:ann@example.test",
            "quarantine.release",
            f"{qid}/0",
            "user=ann@example.test sender=<pat@example.com> reason=community.unknown",
        )
    ]
    with pytest.raises(NotHeldError):
        world.q.release_sync(qid, 0, actor="web:ann@example.test")
    # Another user cannot release (or learn of) ann's mail.
    other = world.held()
    with pytest.raises(NotHeldError):
        world.q.release_sync(other, 0, actor="web:bob@example.test", user=BOB)
    assert world.state(other) is State.HELD


def test_antivirus_hold_is_released_by_admins_only(world: World) -> None:
    qid = world.held(ANN, DKIM_FAIL, VIRUS)
    with pytest.raises(AdminOnlyError, match="anti-virus"):
        world.q.release_sync(qid, 0, actor="web:ann@example.test")
    assert world.state(qid) is State.HELD
    assert [h.reason for h in world.q.list_sync(ANN)] == ["antivirus.virus"]
    assert world.spool.take_flush_requests_sync() == []
    # The spool decides, not the index: a tampered row does not help.
    with world.db.write() as conn:
        conn.execute("UPDATE quarantine SET reason = 'community.unknown', layer = 'community'")
    with pytest.raises(AdminOnlyError):
        world.q.release_sync(qid, 0, actor="web:ann@example.test")
    # Nor does the SAV path release it (the tampered row says "community").
    assert world.q.release_sender_sync(ANN, "pat@example.com", actor="sav") == []
    assert world.state(qid) is State.HELD
    world.q.release_sync(qid, 0, actor="cli:root", admin=True)
    assert world.state(qid) is State.PENDING
    assert [a[1] for a in world.audit()] == [
        "quarantine.release_refused",
        "quarantine.release_refused",
        "quarantine.release_refused",
        "quarantine.release",
    ]
    assert world.audit()[-1][3].endswith("as admin")  # type: ignore[union-attr]


def test_release_never_relays(tmp_path: Path) -> None:
    # old.example was local when the message came; the config no longer says so.
    w = make_world(tmp_path / "var")
    try:
        qid = w.held("ann@old.example")
        with pytest.raises(NotLocalError, match="never relays"):
            w.q.release_sync(qid, 0, actor="cli:root", admin=True)
        assert w.state(qid) is State.HELD
    finally:
        w.db.close()


def test_release_sender_in_arrival_order(world: World) -> None:
    # Accepted out of order: arrival is the message's received time.
    third = world.held(subject="third", received=T0 + 30)
    first = world.held(subject="first", received=T0 + 10)
    second = world.held(subject="second", received=T0 + 20)
    spoofed = world.held(ANN, DKIM_FAIL, UNKNOWN, subject="held by layer 3")
    other_sender = world.held(sender="joe@example.net")
    for_bob = world.held(BOB)
    released = world.q.release_sender_sync(ANN, "Pat@Example.com", actor="sav:verified")
    assert [h.queue_id for h in released] == [first, second, third]
    for qid in (first, second, third):
        assert world.state(qid) is State.PENDING
    for qid in (spoofed, other_sender, for_bob):
        assert world.state(qid) is State.HELD
    assert sorted(world.spool.take_flush_requests_sync()) == sorted([first, second, third])
    assert [h.queue_id for h in world.q.list_sync(ANN)] == [other_sender, spoofed]
    assert world.q.release_sender_sync(ANN, "pat@example.com", actor="sav:verified") == []


# ---------------------------------------------------------------- allow+release and block


def entries(core: Core, user: str) -> list[tuple[str, str, str]]:
    return sorted((e.entry, e.kind, e.source) for e in core.community.list(user))


def test_sender_identity_prefers_the_authenticated_one() -> None:
    authed = Verdict(
        Layer.COMMUNITY,
        Action.QUARANTINE,
        "community.unknown",
        "unknown: Pat@Example.COM (DMARC pass) is not in the community of ann@example.test",
    )
    unauthed = Verdict(
        Layer.COMMUNITY, Action.QUARANTINE, "community.unknown", "unauthenticated: x: no DMARC"
    )
    r = Recipient(ANN, Outcome.QUARANTINE, (DKIM_FAIL, authed))
    assert sender_identity(r, "bounce-1@mailer.example.net") == "pat@example.com"
    r = Recipient(ANN, Outcome.QUARANTINE, (unauthed,))
    assert sender_identity(r, "Bounce-1@Mailer.Example.NET") == "bounce-1@mailer.example.net"
    assert sender_identity(Recipient(ANN, Outcome.QUARANTINE, (DKIM_FAIL,)), "") == ""


def test_allow_release_teaches_and_releases_every_copy_of_that_sender(
    world: World, core: Core
) -> None:
    first = world.held(subject="first", received=T0 + 10)
    second = world.held(subject="second", received=T0 + 20)
    other_sender = world.held(sender="joe@example.net")
    for_bob = world.held(BOB)
    t = world.q.allow_release_sync(second, 0, core=core, actor="user:ann", user=ANN)
    assert (t.entry, t.kind, t.added) == ("pat@example.com", "allow", True)
    assert [h.queue_id for h in t.copies] == [second, first]
    assert entries(core, ANN) == [("pat@example.com", "allow", "manual")]
    assert entries(core, BOB) == []
    assert world.core_member(core, ANN, "pat@example.com") == "allowed"
    assert world.state(first) is State.PENDING and world.state(second) is State.PENDING
    assert world.state(other_sender) is State.HELD and world.state(for_bob) is State.HELD
    assert [a[1] for a in world.audit()] == [
        "quarantine.allow",
        "quarantine.release",
        "quarantine.release",
    ]
    assert "entry=pat@example.com source=manual" in str(world.audit()[0][3])
    # Someone else's copy is "not held", and nothing is taught.
    with pytest.raises(NotHeldError):
        world.q.allow_release_sync(for_bob, 0, core=core, actor="user:ann", user=ANN)
    assert entries(core, BOB) == []


def test_allow_release_of_an_antivirus_hold_is_for_admins(world: World, core: Core) -> None:
    virus = world.held(ANN, VIRUS)
    with pytest.raises(AdminOnlyError):
        world.q.allow_release_sync(virus, 0, core=core, actor="user:ann", user=ANN)
    assert entries(core, ANN) == [] and world.state(virus) is State.HELD
    t = world.q.allow_release_sync(virus, 0, core=core, actor="cli:root", admin=True)
    assert entries(core, ANN) == [("pat@example.com", "allow", "admin")]
    assert [h.queue_id for h in t.copies] == [virus] and world.state(virus) is State.PENDING


def test_allow_list_release(world: World, core: Core) -> None:
    listed = world.held(extra=b"List-Id: Friends <friends.lists.example.org>\r\n")
    other = world.held()
    t = world.q.allow_list_release_sync(listed, 0, core=core, actor="user:ann", user=ANN)
    assert t.entry == "list:friends.lists.example.org"
    assert entries(core, ANN) == [("list:friends.lists.example.org", "allow", "manual")]
    assert world.state(listed) is State.PENDING and world.state(other) is State.HELD
    with pytest.raises(QuarantineError, match="no List-Id"):
        world.q.allow_list_release_sync(other, 0, core=core, actor="user:ann")
    assert world.state(other) is State.HELD


def test_block_teaches_and_deletes_every_copy_of_that_sender(world: World, core: Core) -> None:
    a = world.held(subject="a")
    b = world.held(ANN, DKIM_FAIL, subject="held by layer 3")
    other_sender = world.held(sender="joe@example.net")
    for_bob = world.held(BOB)
    t = world.q.block_sync(a, 0, core=core, actor="user:ann", user=ANN)
    assert (t.entry, t.kind) == ("pat@example.com", "block")
    assert sorted(h.queue_id for h in t.copies) == sorted([a, b])
    assert entries(core, ANN) == [("pat@example.com", "block", "manual")]
    assert world.core_member(core, ANN, "pat@example.com") == "blocked"
    for qid in (a, b):
        with pytest.raises(MessageNotFoundError):
            world.spool.load_sync(qid)
    assert world.state(other_sender) is State.HELD and world.state(for_bob) is State.HELD
    assert [h.queue_id for h in world.q.list_sync(ANN)] == [other_sender]
    assert [a[1] for a in world.audit()] == [
        "quarantine.block",
        "quarantine.delete",
        "quarantine.delete",
    ]


def test_null_sender_unauthenticated_cannot_be_taught(world: World, core: Core) -> None:
    bounce = world.held(ANN, DKIM_FAIL, sender="")
    with pytest.raises(QuarantineError, match="no sender"):
        world.q.block_sync(bounce, 0, core=core, actor="cli:root")
    with pytest.raises(QuarantineError, match="no sender"):
        world.q.allow_release_sync(bounce, 0, core=core, actor="cli:root")
    assert world.state(bounce) is State.HELD and entries(core, ANN) == []


# ---------------------------------------------------------------- delete, retention, quota


def test_delete_removes_a_message_nothing_else_waits_for(world: World) -> None:
    lone = world.held()
    shared = world.accept((ANN, Outcome.QUARANTINE, (UNKNOWN,)), (BOB, Outcome.DELIVER, ()))
    world.q.index_sync(shared)
    world.q.delete_sync(lone, 0, actor="web:ann@example.test", user=ANN)
    with pytest.raises(MessageNotFoundError):
        world.spool.load_sync(lone)
    world.q.delete_sync(shared, 0, actor="web:ann@example.test")
    msg = world.spool.load_sync(shared)
    assert [r.state for r in msg.recipients] == [State.DELETED, State.PENDING]
    assert world.q.list_sync(ANN) == []
    assert [a[1] for a in world.audit()] == ["quarantine.delete", "quarantine.delete"]


def test_retention_sweep_with_a_moved_clock(world: World) -> None:
    old = world.held(subject="old", received=T0 - DAYS * DAY - 1)
    due = world.held(subject="due", received=T0 - DAYS * DAY)
    young = world.held(subject="young", received=T0 - DAYS * DAY + 60)
    fresh = world.held(subject="fresh", received=T0)
    shared = world.accept(
        (ANN, Outcome.QUARANTINE, (UNKNOWN,)),
        (BOB, Outcome.DELIVER, ()),
        received=T0 - 10 * DAY,
    )
    world.q.index_sync(shared)

    s = world.q.sweep_sync(T0, limit=2)
    assert (s.deleted, s.more) == (2, True)
    s = world.q.sweep_sync(T0, limit=2)
    assert (s.deleted, s.more) == (1, False)
    for qid in (old, due):
        with pytest.raises(MessageNotFoundError):
            world.spool.load_sync(qid)
    # The deliverable recipient keeps its message in the spool.
    assert [r.state for r in world.spool.load_sync(shared).recipients] == [
        State.DELETED,
        State.PENDING,
    ]
    assert world.spool.load_sync(shared).recipients[0].detail == (
        "expired after 2 days in quarantine"
    )
    assert {h.subject for h in world.q.list_sync(ANN)} == {"young", "fresh"}
    assert world.state(young) is State.HELD and world.state(fresh) is State.HELD
    assert [a[:2] for a in world.audit()] == [("system:retention", "quarantine.expire")] * 3

    # An hour later the young one's time is up, and only its.
    world.clock.t = T0 + 3600
    assert world.q.sweep_sync().deleted == 1
    assert [h.subject for h in world.q.list_sync(ANN)] == ["fresh"]
    assert world.q.sweep_sync(T0 + DAYS * DAY - 1).deleted == 0
    assert world.q.sweep_sync(T0 + DAYS * DAY).deleted == 1
    assert world.q.list_sync(ANN) == []


def test_retention_never_deletes_early_whatever_the_index_says(tmp_path: Path) -> None:
    w = make_world(tmp_path / "var", days=DAYS)
    try:
        qid = w.held(received=T0 - DAY)
        # A longer retention is configured after the row was written, or the
        # row is simply wrong: the message's own time decides.
        with w.db.write() as conn:
            conn.execute("UPDATE quarantine SET expires_at = ?", (int(T0) - 5,))
        s = w.q.sweep_sync(T0)
        assert (s.deleted, s.kept) == (0, 1)
        assert w.state(qid) is State.HELD
        assert w.q.held_sync(qid)[0].expires_at == int(T0 - DAY) + DAYS * DAY
    finally:
        w.db.close()


def test_usage_for_the_quota(world: World) -> None:
    a = world.held(body=b"x" * 1000 + b"\r\n")
    b = world.held(body=b"y" * 5000 + b"\r\n")
    world.held(BOB)
    sizes = world.spool.load_sync(a).size + world.spool.load_sync(b).size
    assert world.q.usage_sync(ANN) == sizes
    assert world.q.usage_sync("Ann@Example.test") == sizes
    world.q.delete_sync(b, 0, actor="cli:root")
    assert world.q.usage_sync(ANN) == world.spool.load_sync(a).size
    assert world.q.usage_sync("nobody@example.test") == 0


def test_hold_allowed_within_the_quota(tmp_path: Path) -> None:
    w = make_world(tmp_path / "var", quota=4000)
    try:
        w.db.add_user(ANN, password="correct horse")
        assert w.q.hold_allowed_sync(ANN, 10_000) == (True, "")  # empty: any one message
        a = w.held(body=b"x" * 1000 + b"\r\n")
        used = w.spool.load_sync(a).size
        assert w.q.hold_allowed_sync("Ann@Example.test", 4000 - used) == (True, "")
        ok, why = w.q.hold_allowed_sync(ANN, 4000 - used + 1)
        assert not ok and f"{used} of 4000 bytes held" in why
        assert w.q.hold_allowed_sync(BOB, 10_000) == (True, "")  # someone else's quota
        w.q.delete_sync(a, 0, actor="cli:root")
        assert w.q.hold_allowed_sync(ANN, 10_000) == (True, "")
    finally:
        w.db.close()


def test_reserve_for_only_held_mail_is_twice() -> None:
    Q, D, X = Outcome.QUARANTINE, Outcome.DELIVER, Outcome.DISCARD
    assert reserve_for([Q], 100) == 200
    assert reserve_for([Q, X], 100) == 200
    assert reserve_for([Q, D], 100) == 100
    assert reserve_for([D], 100) == 100
    assert reserve_for([X], 100) == 100
    assert reserve_for([], 100) == 100


def test_spool_refuses_held_only_mail_below_twice_the_reserve(world: World) -> None:
    # A reserve of two thirds of the free space: one times it leaves room,
    # twice it does not.
    free = shutil.disk_usage(world.spool.root).free
    base = free * 2 // 3
    env = Envelope(
        received=T0,
        client_ip="192.0.2.7",
        helo="mail.example.com",
        mail_from="pat@example.com",
        recipients=(Recipient(ANN, Outcome.QUARANTINE, (UNKNOWN,)),),
    )
    held_only = [r.outcome for r in env.recipients]
    with pytest.raises(SpoolFullError):
        world.spool.accept_sync(env, b"x\r\n", reserve_bytes=reserve_for(held_only, base))
    member = (*env.recipients, Recipient(BOB, Outcome.DELIVER, (MEMBER,)))
    mixed = Envelope(
        received=T0,
        client_ip="192.0.2.7",
        helo="mail.example.com",
        mail_from="pat@example.com",
        recipients=member,
    )
    outcomes = [r.outcome for r in mixed.recipients]
    qid = world.spool.accept_sync(mixed, b"x\r\n", reserve_bytes=reserve_for(outcomes, base))
    assert world.state(qid, 0) is State.HELD and world.state(qid, 1) is State.PENDING


# ---------------------------------------------------------------- the CLI


def kith(cfg: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(KITH), "-c", str(cfg), "quarantine", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if ok and done.returncode != 0:
        raise AssertionError(f"kith quarantine {' '.join(args)}: {done.returncode} {done.stderr}")
    return done


def test_cli(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    cfg = tmp_path / "kithmail.toml"
    cfg.write_text(
        f'[server]\ndata_dir = "{data_dir}"\n\n[domains]\nlocal = ["example.test"]\n\n'
        f"[community]\nquarantine_days = {DAYS}\n"
    )
    w = make_world(data_dir)
    w.clock.t = time.time()
    try:
        w.db.add_user(ANN, password="correct horse")
        plain = w.held(subject="plain", received=w.clock.t - 60)
        virus = w.held(ANN, VIRUS, subject="virus", received=w.clock.t - 30)
        expired = w.held(subject="expired", received=w.clock.t - (DAYS + 1) * DAY)
    finally:
        w.db.close()
    me = f"cli:{pwd.getpwuid(os.getuid()).pw_name}"

    doc = json.loads(kith(cfg, "list", ANN, "--json").stdout)
    assert [(d["queue_id"], d["subject"], d["reason"]) for d in doc] == [
        (virus, "virus", "antivirus.virus"),
        (plain, "plain", "community.unknown"),
        (expired, "expired", "community.unknown"),
    ]
    assert doc[0]["admin_only"] is True
    text = kith(cfg, "list", ANN, "--subject", "plain").stdout
    assert plain in text and virus not in text
    assert text.rstrip().endswith(f"1-1 of 1 held for {ANN}")

    shown = kith(cfg, "show", plain, "0").stdout
    assert "subject    plain" in shown and "community: quarantine community.unknown" in shown
    assert json.loads(kith(cfg, "show", plain, "--json").stdout)[0]["recipient"] == ANN

    done = kith(cfg, "release", virus, "0", ok=False)
    assert done.returncode == 1 and "--admin" in done.stderr
    kith(cfg, "release", plain, "0")
    kith(cfg, "release", virus, "0", "--admin")
    done = kith(cfg, "release", plain, "0", ok=False)
    assert done.returncode == 1 and "not held" in done.stderr

    assert "1 held copy expired" in kith(cfg, "sweep").stdout
    assert json.loads(kith(cfg, "list", ANN, "--json").stdout) == []

    w = make_world(data_dir)
    try:
        assert w.state(plain) is State.PENDING and w.state(virus) is State.PENDING
        with pytest.raises(MessageNotFoundError):
            w.spool.load_sync(expired)
        assert [(a[0], a[1]) for a in w.audit()] == [
            (me, "quarantine.release_refused"),
            (me, "quarantine.release"),
            (me, "quarantine.release"),
            ("system:retention", "quarantine.expire"),
        ]
        again = w.held(subject="to delete")
    finally:
        w.db.close()
    kith(cfg, "delete", again, "0")
    done = kith(cfg, "show", again, "0", ok=False)
    assert done.returncode == 1


def test_cli_allow_and_block(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    cfg = tmp_path / "kithmail.toml"
    cfg.write_text(f'[server]\ndata_dir = "{data_dir}"\n\n[domains]\nlocal = ["example.test"]\n')
    w = make_world(data_dir)
    w.clock.t = time.time()
    try:
        w.db.add_user(ANN, password="correct horse")
        w.db.add_user(BOB, password="correct horse")
        one = w.held(subject="one")
        two = w.held(subject="two")
        virus = w.held(BOB, VIRUS)
        listed = w.held(BOB, extra=b"List-Id: <news.example.org>\r\n", sender="joe@example.net")
        unauthenticated = Verdict(
            Layer.COMMUNITY, Action.QUARANTINE, "community.unknown", "unauthenticated: no DMARC"
        )
        spam = w.held(BOB, unauthenticated, sender="spam@example.net")
    finally:
        w.db.close()
    out = kith(cfg, "allow", one, "0").stdout
    assert f"pat@example.com: added to the allow list of {ANN}" in out
    assert f"{one}/0: released" in out and f"{two}/0: released" in out
    done = kith(cfg, "allow", virus, "0", ok=False)
    assert done.returncode == 1 and "--admin" in done.stderr
    kith(cfg, "allow", listed, "0", "--list")
    out = kith(cfg, "block", spam, "0").stdout
    assert f"spam@example.net: added to the block list of {BOB}" in out
    core = Core(str(data_dir / "core"))
    try:
        assert entries(core, ANN) == [("pat@example.com", "allow", "manual")]
        assert entries(core, BOB) == [
            ("list:news.example.org", "allow", "manual"),
            ("spam@example.net", "block", "manual"),
        ]
    finally:
        core.close()
    w = make_world(data_dir)
    try:
        assert w.state(one) is State.PENDING and w.state(two) is State.PENDING
        assert w.state(listed) is State.PENDING and w.state(virus) is State.HELD
        with pytest.raises(MessageNotFoundError):
            w.spool.load_sync(spam)
    finally:
        w.db.close()
