"""The durable spool: what a 250 promises, on a real file system.

DESIGN.md "No loss": 250 after DATA means the message is fsync'd in the
spool; a crash or a full disk never loses an accepted message, and a full
disk is a 452 4.3.1 (`SpoolFullError`), not a 250. Writers are killed with
SIGKILL in fresh interpreters (sys.executable); the full disk is a real
tmpfs mounted for the test (root), never a mock. A SIGKILL keeps the page
cache, so these tests prove the protocol (tmp, rename, end record,
recovery), not the fsyncs themselves against power loss.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from disk import tmpfs
from hypothesis import given, settings
from hypothesis import strategies as st

from kithmail.layers import Action, Layer, SmtpReply, Verdict
from kithmail.spool import (
    CorruptMessageError,
    Envelope,
    MessageNotFoundError,
    Outcome,
    Recipient,
    Recovery,
    Spool,
    SpoolError,
    SpoolFullError,
    State,
    StateError,
    UnsupportedVersionError,
)

RunPython = Callable[..., "subprocess.CompletedProcess[str]"]

MSG = (
    b"From: Ann <ann@example.org>\r\nTo: bob@example.test\r\nSubject: hi\r\n\r\n"
    b"body \xc3\xa9 with 8 bits and a NUL \x00 byte\r\n.\r\n"
)
QUEUE_ID = re.compile(r"[0-9a-hjkmnp-tv-z]{19}")


def envelope(*outcomes: Outcome, received: float = 1_700_000_000.25) -> Envelope:
    outcomes = outcomes or (Outcome.DELIVER,)
    return Envelope(
        received=received,
        client_ip="2001:db8::7",
        helo="mx.example.org",
        mail_from="ann@example.org",
        recipients=tuple(
            Recipient(
                f"user{i}@example.test",
                o,
                (
                    Verdict(Layer.RECON, Action.ACCEPT, "recon.passed"),
                    Verdict(
                        Layer.SPOOFING,
                        Action.QUARANTINE,
                        "spf.softfail",
                        "198.51.100.7 not in example.org's SPF record",
                        SmtpReply(250, "2.0.0", "held"),
                    ),
                    Verdict(Layer.COMMUNITY, Action.DISCARD, "community.blocked").in_shadow(),
                ),
            )
            for i, o in enumerate(outcomes)
        ),
        tenant="example",
        mail_options=("BODY=8BITMIME", "SMTPUTF8"),
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "data" / "spool"


@pytest.fixture
def spool(root: Path) -> Spool:
    return Spool(root)


def files(d: Path) -> list[str]:
    return sorted(os.listdir(d))


# ---------------------------------------------------------------- round trip


def test_round_trip_envelope_states_and_data(spool: Spool, root: Path) -> None:
    env = envelope(Outcome.DELIVER, Outcome.QUARANTINE, Outcome.DISCARD)
    qid = spool.accept_sync(env, MSG)

    assert QUEUE_ID.fullmatch(qid)
    assert files(root / "tmp") == []
    assert files(root / "active") == [f"{qid}.msg"]
    m = spool.load_sync(qid)
    assert m.queue_id == qid
    assert m.envelope == env
    assert m.size == len(MSG)
    assert m.read_bytes() == MSG
    assert [(s.index, s.recipient.address, s.state) for s in m.recipients] == [
        (0, "user0@example.test", State.PENDING),
        (1, "user1@example.test", State.HELD),
        (2, "user2@example.test", State.DISCARDED),
    ]
    assert m.recipients[1].recipient.reasons == (
        "recon.passed",
        "spf.softfail",
        "community.blocked",
    )
    assert m.envelope.recipients[0].verdicts[2].shadow
    assert [s.index for s in m.pending] == [0, 1]
    # The file says what it is to anyone who opens it.
    raw = (root / "active" / f"{qid}.msg").read_bytes()
    assert raw.startswith(b"KITHMAIL-SPOOL 1\nENVELOPE ")
    assert re.fullmatch(rb"END [0-9a-f]{16} [0-9a-f]{64}\n", raw[-86:])
    assert raw[-86 + 21 :].startswith(hashlib.sha256(raw[:-86]).hexdigest().encode())
    assert (root / "active" / f"{qid}.msg").stat().st_mode & 0o777 == 0o600


def test_any_string_in_the_envelope_round_trips_exactly(tmp_path: Path) -> None:
    # Lone surrogates included: a client's non-UTF-8 bytes decoded with
    # surrogateescape must come back as the same str.
    spool = Spool(tmp_path / "spool")

    @settings(max_examples=150, deadline=None)
    @given(
        strs=st.lists(st.text(), min_size=5, max_size=5),
        options=st.lists(st.text(), max_size=3),
        received=st.floats(min_value=0, max_value=4e9, allow_nan=False),
        data=st.binary(max_size=3000),
    )
    def check(strs: list[str], options: list[str], received: float, data: bytes) -> None:
        env = Envelope(
            received=received,
            client_ip=strs[0],
            helo=strs[1],
            mail_from=strs[2],
            recipients=(
                Recipient(
                    strs[3],
                    Outcome.QUARANTINE,
                    (Verdict(Layer.SPOOFING, Action.TAG, strs[4], strs[0]),),
                ),
                Recipient("jörg@bücher.example", Outcome.DELIVER),
            ),
            tenant=strs[4],
            mail_options=tuple(options),
        )
        qid = spool.accept_sync(env, data)
        m = spool.load_sync(qid)
        assert m.envelope == env
        assert m.read_bytes() == data
        spool.remove_sync(qid, force=True)

    check()


def test_streamed_data_sync_and_async_come_back_whole(spool: Spool) -> None:
    pieces: list[bytes | bytearray | memoryview] = [
        b"line %d\r\n" % i for i in range(20_000)
    ]  # many small chunks
    pieces[5000] = os.urandom(300_000)  # and one big one, written uncopied
    pieces[6000] = bytearray(b"a bytearray\r\n")
    pieces[7000] = memoryview(b"a memoryview\r\n")
    whole = b"".join(pieces)
    assert len(whole) > 400_000

    async def agen() -> AsyncIterator[bytes | bytearray | memoryview]:
        for p in pieces:
            yield p

    async def both() -> tuple[str, str, str]:
        return (
            await spool.accept(envelope(), agen()),
            await spool.accept(envelope(), iter(pieces)),
            await spool.accept(envelope(), whole),
        )

    for qid in asyncio.run(both()):
        m = spool.load_sync(qid)
        assert m.size == len(whole)
        sizes = [len(c) for c in m.chunks(4096)]
        assert max(sizes) == 4096
        assert b"".join(m.chunks()) == whole
        with m.open() as f:
            f.seek(len(whole) - 10)
            assert f.read() == whole[-10:]
            f.seek(5)
            assert f.read(7) == whole[5:12]


def test_ids_are_unique_ordered_and_safe(root: Path) -> None:
    # A clock stuck in place, then stepping back: still strictly increasing.
    ticks = iter([1000.0] * 50 + [999.0] * 50)
    spool = Spool(root, clock=lambda: next(ticks))
    ids = [spool.accept_sync(envelope(), b"x") for _ in range(100)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 100
    assert all(QUEUE_ID.fullmatch(q) for q in ids)
    assert spool.queue_ids_sync() == ids
    assert spool.recover_sync().pending == tuple(ids)

    # Concurrent accepts on a real clock, and ids a second spool (another
    # worker) makes, never collide.
    async def many(s: Spool) -> list[str]:
        return list(await asyncio.gather(*(s.accept(envelope(), MSG) for _ in range(50))))

    a = asyncio.run(many(Spool(root)))
    b = asyncio.run(many(Spool(root)))
    assert len(set(ids + a + b)) == 200
    assert sorted(a)[-1] < sorted(b)[0]  # later arrivals sort later
    assert len(Spool(root).queue_ids_sync()) == 200


def test_accepted_message_is_read_by_a_new_process(
    spool: Spool, root: Path, run_python: RunPython
) -> None:
    env = envelope(Outcome.DELIVER, Outcome.QUARANTINE)
    qid = asyncio.run(spool.accept(env, MSG))
    assert files(root / "active") == [f"{qid}.msg"]

    r = run_python(
        """
import hashlib, json, sys
from pathlib import Path
from kithmail.spool import Spool
m = Spool(Path(sys.argv[1])).load_sync(sys.argv[2])
print(json.dumps({"from": m.envelope.mail_from, "rcpts": [s.recipient.address for s in m.recipients],
                  "states": [s.state for s in m.recipients], "reasons": list(m.recipients[0].recipient.reasons),
                  "sha": hashlib.sha256(m.read_bytes()).hexdigest()}))
""",
        str(root),
        qid,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "from": "ann@example.org",
        "rcpts": ["user0@example.test", "user1@example.test"],
        "states": ["pending", "held"],
        "reasons": ["recon.passed", "spf.softfail", "community.blocked"],
        "sha": hashlib.sha256(MSG).hexdigest(),
    }


def test_bad_input_is_refused_and_leaves_nothing(spool: Spool, root: Path) -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        Envelope(0.0, "192.0.2.1", "h", "a@example.org", ())
    with pytest.raises(TypeError, match="not str"):
        spool.accept_sync(envelope(), "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not int"):
        spool.accept_sync(envelope(), [b"ok", 7])  # type: ignore[list-item]

    def broken() -> Iterator[bytes]:
        yield b"x" * 200_000
        raise ValueError("client went away")

    with pytest.raises(ValueError, match="client went away"):
        spool.accept_sync(envelope(), broken())
    assert files(root / "tmp") == files(root / "active") == []
    for bad in ("../../etc/passwd", "", "0" * 19 + "/", "I" * 19):
        with pytest.raises(MessageNotFoundError):
            spool.load_sync(bad)


def test_cancelled_accept_leaves_nothing(spool: Spool, root: Path) -> None:
    async def main() -> None:
        started = asyncio.Event()

        async def stalls() -> AsyncIterator[bytes]:
            yield b"x" * 100_000
            started.set()
            await asyncio.Event().wait()  # the client stops sending
            yield b"never"

        task = asyncio.create_task(spool.accept(envelope(), stalls()))
        await started.wait()
        assert len(files(root / "tmp")) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert files(root / "tmp") == files(root / "active") == []


@pytest.mark.parametrize("form", ["bytes", "iterable"])
def test_cancelled_accept_leaves_nothing_wherever_it_lands(
    spool: Spool, root: Path, form: str
) -> None:
    # The writing thread cannot be stopped: whatever it got to (tmp/, or
    # already renamed into active/), nobody was told the id, so it goes.
    big = os.urandom(4 << 20)

    async def main() -> list[str]:
        kept: list[str] = []
        cancelled = 0
        for delay in (0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128):
            data = (
                big if form == "bytes" else (big[i : i + 65536] for i in range(0, len(big), 65536))
            )
            task = asyncio.create_task(spool.accept(envelope(), data))
            await asyncio.sleep(delay)
            if task.cancel():
                cancelled += 1
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                kept.append(task.result())
        assert cancelled
        return kept

    kept = asyncio.run(main())
    assert files(root / "tmp") == []
    assert files(root / "active") == sorted(f"{q}.msg" for q in kept)
    for q in kept:
        assert spool.load_sync(q).read_bytes() == big


# ---------------------------------------------------------------- crashes

WRITER = """
import asyncio, sys, time
from pathlib import Path
from kithmail.spool import Envelope, Recipient, Spool
spool = Spool(Path(sys.argv[1]))
env = Envelope(1.0, "192.0.2.1", "h", "a@example.org", (Recipient("b@example.test", "deliver"),))
print(spool.accept_sync(env, b"acknowledged\\r\\n" * 10000), flush=True)

def slow():
    for _ in range(100000):
        yield b"y" * 65536
        time.sleep(0.005)

async def aslow():
    for _ in range(100000):
        yield b"y" * 65536
        await asyncio.sleep(0.005)

if sys.argv[2] == "sync":
    spool.accept_sync(env, slow())
else:
    asyncio.run(spool.accept(env, aslow()))
print("not killed", flush=True)
"""


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_mid_write_loses_nothing_acknowledged(spool: Spool, root: Path, mode: str) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), mode], stdout=subprocess.PIPE, text=True
    ) as p:
        try:
            assert p.stdout is not None
            acked = p.stdout.readline().strip()  # printed only after accept returned
            assert QUEUE_ID.fullmatch(acked), acked
            deadline = time.monotonic() + 30
            while not any((root / "tmp" / n).stat().st_size > 1 << 20 for n in files(root / "tmp")):
                assert time.monotonic() < deadline, "the writer never got going"
                time.sleep(0.01)
            p.send_signal(signal.SIGKILL)
        finally:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL

    rec = Spool(root).recover_sync()
    assert rec.pending == (acked,)
    assert len(rec.unacknowledged) == 1
    assert (rec.corrupt, rec.finished, rec.skipped) == ((), (), ())
    assert files(root / "tmp") == []
    assert files(root / "active") == [f"{acked}.msg"]
    assert spool.load_sync(acked).read_bytes() == b"acknowledged\r\n" * 10000


def test_torn_and_damaged_files_go_to_corrupt(spool: Spool, root: Path) -> None:
    active = root / "active"
    good = spool.accept_sync(envelope(), MSG)
    cut_end = spool.accept_sync(envelope(), MSG)
    cut_mid = spool.accept_sync(envelope(), os.urandom(100_000))
    cut_env = spool.accept_sync(envelope(), MSG)
    flip_data = spool.accept_sync(envelope(), MSG)
    flip_env = spool.accept_sync(envelope(), MSG)
    empty = spool.accept_sync(envelope(), MSG)
    spool.mark_sync(cut_end, 0, State.DEFERRED, "451 try later")

    def edit(qid: str, f: Callable[[bytes], bytes]) -> None:
        p = active / f"{qid}.msg"
        p.write_bytes(f(p.read_bytes()))

    edit(cut_end, lambda b: b[:-5])
    edit(cut_mid, lambda b: b[: len(b) // 2])
    edit(cut_env, lambda b: b[:200])
    edit(flip_data, lambda b: b.replace(b"body", b"bodY"))
    edit(flip_env, lambda b: b.replace(b"ann@example.org", b"ann@example.orh"))
    edit(empty, lambda b: b"")

    # Never handed out, even before recovery.
    for bad in (cut_end, cut_mid, cut_env, flip_data, flip_env, empty):
        with pytest.raises(CorruptMessageError):
            spool.load_sync(bad)

    rec = spool.recover_sync()
    assert rec.pending == (good,)
    why = dict(rec.corrupt)
    assert sorted(why) == sorted(
        f"{q}.msg" for q in (cut_end, cut_mid, cut_env, flip_data, flip_env, empty)
    )
    assert why[f"{cut_end}.msg"] == "no end record (torn write)"
    assert why[f"{cut_mid}.msg"] == "no end record (torn write)"
    assert why[f"{cut_env}.msg"] == "truncated in the envelope"
    assert why[f"{flip_data}.msg"] == "checksum mismatch (damaged on disk)"
    assert why[f"{flip_env}.msg"] == "checksum mismatch (damaged on disk)"
    assert why[f"{empty}.msg"] == "no spool header"
    assert files(active) == [f"{good}.msg"]
    assert f"{cut_end}.state" in files(root / "corrupt")  # its history goes with it
    assert len(files(root / "corrupt")) == 7
    with pytest.raises(MessageNotFoundError):
        spool.load_sync(flip_data)
    assert spool.recover_sync().corrupt == ()  # reported once


def test_newer_format_is_left_alone(spool: Spool, root: Path) -> None:
    qid = spool.accept_sync(envelope(), MSG)
    p = root / "active" / f"{qid}.msg"
    p.write_bytes(p.read_bytes().replace(b"KITHMAIL-SPOOL 1\n", b"KITHMAIL-SPOOL 2\n", 1))
    with pytest.raises(UnsupportedVersionError, match="spool format 2"):
        spool.load_sync(qid)
    rec = spool.recover_sync()
    assert (rec.pending, rec.corrupt) == ((), ())
    assert [n for n, _ in rec.skipped] == [f"{qid}.msg"]
    assert p.exists()


def test_recover_cleans_tmp_orphans_and_finished(spool: Spool, root: Path) -> None:
    done = spool.accept_sync(envelope(Outcome.DELIVER, Outcome.DISCARD), MSG)
    spool.mark_sync(done, 0, State.DELIVERED, "250 2.0.0 queued as X")  # crash before remove()
    all_discarded = spool.accept_sync(envelope(Outcome.DISCARD), MSG)
    held = spool.accept_sync(envelope(Outcome.QUARANTINE), MSG)
    (root / "tmp" / "0000000000000000000").write_bytes(b"KITHMAIL-SPOOL 1\nENVEL")
    orphan = root / "active" / f"{'0' * 19}.state"
    orphan.write_bytes(b"")
    (root / "active" / "README").write_text("an operator's note")

    rec = spool.recover_sync()
    assert rec.pending == (held,)  # a held message is kept: the quarantine's truth
    assert rec.finished == (done, all_discarded)
    assert rec.unacknowledged == ("0000000000000000000",)
    assert rec.skipped == (("README", "not a spool file"),)
    assert files(root / "tmp") == []
    assert files(root / "active") == [f"{held}.msg", "README"]


# ---------------------------------------------------------------- per-recipient state


def test_states_are_durable_final_is_final(root: Path) -> None:
    now = [100.0]
    spool = Spool(root, clock=lambda: now[0])
    qid = spool.accept_sync(envelope(Outcome.DELIVER, Outcome.QUARANTINE), MSG)
    spool.mark_sync(qid, 0, State.DEFERRED, "451 4.4.1 downstream away")
    now[0] = 160.0
    asyncio.run(spool.mark(qid, 0, State.DELIVERED, "250 2.0.0 ok"))

    s = Spool(root).load_sync(qid).recipients
    assert (s[0].state, s[0].detail, s[0].at) == (State.DELIVERED, "250 2.0.0 ok", 160.0)
    assert (s[1].state, s[1].at) == (State.HELD, None)

    with pytest.raises(StateError, match="already delivered"):
        spool.mark_sync(qid, 0, State.PENDING)
    with pytest.raises(StateError, match="no recipient 2"):
        spool.mark_sync(qid, 2, State.DELIVERED)
    with pytest.raises(StateError, match=r"recipients \[1\] are not final"):
        spool.remove_sync(qid)

    spool.mark_sync(qid, 1, State.PENDING, "released by ann")  # out of quarantine
    spool.mark_sync(qid, 1, State.DELIVERED)
    asyncio.run(spool.remove(qid))
    assert files(root / "active") == []
    with pytest.raises(MessageNotFoundError):
        spool.load_sync(qid)
    with pytest.raises(MessageNotFoundError):
        spool.mark_sync(qid, 0, State.PENDING)
    assert files(root / "active") == []  # no orphan state file made

    forced = spool.accept_sync(envelope(), MSG)
    spool.remove_sync(forced, force=True)  # `kith queue delete`
    assert files(root / "active") == []


def test_torn_state_line_is_ignored_never_misread(spool: Spool, root: Path) -> None:
    qid = spool.accept_sync(envelope(Outcome.DELIVER, Outcome.DELIVER), MSG)
    spool.mark_sync(qid, 0, State.DEFERRED, "451 first try")
    state = root / "active" / f"{qid}.state"
    line = state.read_bytes()
    assert line.count(b"\n") == 1

    # A crash mid-append: a record for recipient 1, cut before its end.
    delivered_1 = line.replace(b'"r":0', b'"r":1').replace(b"deferred", b"delivered")
    with open(state, "ab") as f:
        f.write(delivered_1[:-8])
    s = spool.load_sync(qid).recipients
    assert [x.state for x in s] == [State.DEFERRED, State.PENDING]

    # The next append starts a fresh line instead of completing the torn one.
    spool.mark_sync(qid, 0, State.DELIVERED, "250 ok")
    s = spool.load_sync(qid).recipients
    assert [x.state for x in s] == [State.DELIVERED, State.PENDING]

    # Whole lines that fail their CRC, or are not records at all, count for nothing.
    with open(state, "ab") as f:
        f.write(delivered_1.replace(b"delivered", b"discarded"))
        f.write(b"garbage\n\n")
    assert [x.state for x in spool.load_sync(qid).recipients] == [State.DELIVERED, State.PENDING]
    spool.mark_sync(qid, 1, State.BOUNCED, "550 5.1.1 no such user")
    assert [x.state for x in spool.load_sync(qid).recipients] == [State.DELIVERED, State.BOUNCED]


# ---------------------------------------------------------------- a real full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: ENOSPC for real."""
    with tmpfs(tmp_path / "disk", "size=1m,mode=0700") as d:
        yield d


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.mark.parametrize("how", ["bytes", "stream", "async"])
def test_full_disk_refuses_cleanly_and_recovers(small_disk: Path, how: str) -> None:
    root = small_disk / "spool"
    spool = Spool(root)
    big = os.urandom(2 << 20)  # twice the disk

    with pytest.raises(SpoolFullError, match="spool full") as e:
        if how == "bytes":
            spool.accept_sync(envelope(), big)
        elif how == "stream":
            spool.accept_sync(envelope(), (big[i : i + 1000] for i in range(0, len(big), 1000)))
        else:

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(0, len(big), 70_000):
                    yield big[i : i + 70_000]

            asyncio.run(spool.accept(envelope(), chunks()))
    assert isinstance(e.value, SpoolError)
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    assert files(root / "tmp") == files(root / "active") == []
    assert free(small_disk) > 900 * 1024  # the partial file's space is back

    qid = spool.accept_sync(envelope(), MSG)
    assert spool.load_sync(qid).read_bytes() == MSG


def test_full_disk_at_accept_and_at_mark_then_freed(small_disk: Path) -> None:
    root = small_disk / "spool"
    spool = Spool(root)
    before = spool.accept_sync(envelope(Outcome.DELIVER, Outcome.DELIVER), MSG)
    spool.mark_sync(before, 0, State.DEFERRED, "451")
    fresh = spool.accept_sync(envelope(), MSG)  # no state file yet: its first needs a page
    fill(small_disk / "filler")
    assert free(small_disk) == 0

    with pytest.raises(SpoolFullError):
        spool.accept_sync(envelope(), MSG)
    with pytest.raises(SpoolFullError):
        asyncio.run(spool.accept(envelope(), MSG))
    with pytest.raises(SpoolFullError):
        spool.mark_sync(fresh, 0, State.DELIVERED, "250")
    assert files(root / "tmp") == []
    assert files(root / "active") == sorted([f"{before}.msg", f"{before}.state", f"{fresh}.msg"])
    assert spool.load_sync(fresh).recipients[0].state == State.PENDING
    # What was accepted before is untouched and still readable.
    m = spool.load_sync(before)
    assert [s.state for s in m.recipients] == [State.DEFERRED, State.PENDING]
    assert m.read_bytes() == MSG

    (small_disk / "filler").unlink()
    qid = spool.accept_sync(envelope(), MSG)
    spool.mark_sync(before, 1, State.DELIVERED, "250")
    spool.mark_sync(fresh, 0, State.DELIVERED, "250")
    assert [s.state for s in spool.load_sync(before).recipients] == [
        State.DEFERRED,
        State.DELIVERED,
    ]
    assert spool.recover_sync() == Recovery((before, qid), (fresh,), (), (), ())


def test_reserve_refuses_before_the_disk_is_full(small_disk: Path) -> None:
    root = small_disk / "spool"
    spool = Spool(root, reserve_bytes=512 * 1024)
    msg = os.urandom(600 * 1024)
    assert free(small_disk) > len(msg) + 256 * 1024  # it would fit

    with pytest.raises(SpoolFullError, match="kept in reserve"):
        spool.accept_sync(envelope(), msg)
    # Streamed, the size is learnt on the way: refused part-way.
    with pytest.raises(SpoolFullError, match="kept in reserve"):
        spool.accept_sync(envelope(), (msg[i : i + 8192] for i in range(0, len(msg), 8192)))
    assert files(root / "tmp") == files(root / "active") == []
    assert free(small_disk) > len(msg) + 256 * 1024

    small = spool.accept_sync(envelope(), MSG)  # small mail still gets in
    # A caller may spend the reserve (community mail, DESIGN.md "No loss").
    big = spool.accept_sync(envelope(), msg, reserve_bytes=0)
    assert spool.recover_sync().pending == (small, big)


def test_out_of_inodes_is_a_full_spool(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "inodes", "size=1m,nr_inodes=8") as d:
        spool = Spool(d / "spool")
        accepted = []
        with pytest.raises(SpoolFullError):
            for _ in range(10):
                accepted.append(spool.accept_sync(envelope(), MSG))
        assert accepted
        assert files(d / "spool" / "tmp") == []
        assert spool.recover_sync().pending == tuple(accepted)
