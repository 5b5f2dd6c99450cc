"""The durable spool: one file per accepted message, plus per-recipient state.

A message is written to ``tmp/`` under its queue id, flushed, fsync'd,
renamed into ``active/`` and the directory fsync'd; only then does
`Spool.accept` return the id, and only then may the SMTP layer answer 250.
Delivery and quarantine progress is appended, one fsync'd and checksummed
line per transition, to a state file beside the message. `Spool.recover`
runs once at start, before anything is accepted: it drops what was never
acknowledged, moves torn files to ``corrupt/`` and names what is still to do.

On-disk format of ``active/<queue id>.msg`` (version 1)::

    KITHMAIL-SPOOL 1\\n
    ENVELOPE <n>\\n
    <n bytes: the envelope as JSON, pure ASCII>\\n
    DATA\\n
    <the message bytes, exactly as received>
    END <16 hex digits: length of all the above> <64 hex digits: its SHA-256>\\n

The end record has a fixed size and sits at the very end, so a reader finds
it without knowing the data's length, which a streamed write learns only at
its last byte; the data's size is therefore the end record's, not the
envelope's. ``active/<queue id>.state`` holds lines ``<crc32 hex> <JSON>\\n``
(``{"r": recipient index, "s": state, "t": time, "d": detail}``); a line
that is unterminated or fails its CRC is ignored, and the last valid line of
a recipient wins until the recipient is final.

Beside them, two small directories carry an operator's wishes from
``kith queue`` (another process) to the running queue: ``hold/<queue id>``
(an admin hold: the queue does not attempt that message) and
``flush/<queue id or "all">.<random>`` (attempt now; the queue removes
the request when it has read it). Both appear on first use.

Trusts: nothing in the files it did not verify (magic, lengths and checksum
before a message is handed out); the envelope strings as given (the SMTP
layer escapes them wherever they are written into headers). Assumes
``tmp/``, ``active/`` and ``corrupt/`` share one filesystem, so rename is
atomic, and that one process runs `recover` while nobody accepts.

Models: Postfix's queue files (an END record, fsync before the file counts,
``src/global/mail_stream.c``) and Mailman 3's switchboard (write, fsync,
rename, recover at start). Standards: RFC 5321 §6.1 (a 250 is a
promise; duplicates after a crash are allowed, loss is not), RFC 3463 4.3.1
(the SMTP layer's answer to `SpoolFullError`), RFC 6531 (UTF-8 envelopes).
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import threading
import time
import zlib
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NewType, cast

from kithmail.layers import Action, Layer, SmtpReply, Verdict

__all__ = [
    "CorruptMessageError",
    "Envelope",
    "MessageNotFoundError",
    "Outcome",
    "QueueId",
    "Recipient",
    "RecipientStatus",
    "Recovery",
    "Spool",
    "SpoolError",
    "SpoolFullError",
    "SpooledMessage",
    "State",
    "StateError",
    "UnsupportedVersionError",
    "is_queue_id",
]

log = logging.getLogger("kithmail.spool")

QueueId = NewType("QueueId", str)

Chunk = bytes | bytearray | memoryview
Data = Chunk | Iterable[Chunk] | AsyncIterable[Chunk]
# Or a function of the queue id giving the data (it may name its own id).
DataFor = Callable[[str], Data]

MAGIC = b"KITHMAIL-SPOOL "
VERSION = 1
_END = re.compile(rb"END ([0-9a-f]{16}) ([0-9a-f]{64})\n")
END_SIZE = len(b"END %016x %s\n" % (0, b"0" * 64))  # 86
# Bytes gathered before one write(2): bounds memory per message in flight and
# keeps syscalls few when the SMTP layer hands over one line at a time.
FLUSH_SIZE = 64 * 1024
# An envelope is at most max_recipients (10 000) recipients with their
# verdicts; anything bigger is not ours.
_MAX_ENVELOPE = 64 * 1024 * 1024
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


# ---------------------------------------------------------------- errors


class SpoolError(Exception):
    """The spool could not do what was asked; the SMTP layer answers 451 4.3.0."""


class SpoolFullError(SpoolError):
    """No room (ENOSPC, EDQUOT, or the reserve): the SMTP layer answers 452 4.3.1."""


class MessageNotFoundError(SpoolError):
    """No message with that queue id is in the spool (any more)."""


class CorruptMessageError(SpoolError):
    """A message file is torn or damaged; it is never handed out."""


class UnsupportedVersionError(SpoolError):
    """A message file written by a newer kithmail: left alone, never called corrupt."""


class StateError(SpoolError):
    """A state change the spool refuses (a final recipient, an index out of range)."""


# ---------------------------------------------------------------- the vocabulary


class Outcome(enum.StrEnum):
    """What end of DATA decided for one recipient."""

    DELIVER = "deliver"
    QUARANTINE = "quarantine"
    DISCARD = "discard"


class State(enum.StrEnum):
    """Where one recipient's copy stands. Final states never change again."""

    PENDING = "pending"  # to deliver (new, or released from quarantine)
    DEFERRED = "deferred"  # a delivery attempt failed for now; retried later
    HELD = "held"  # in the recipient's quarantine
    DELIVERED = "delivered"
    DISCARDED = "discarded"
    BOUNCED = "bounced"  # failed for good or expired; any DSN is the queue's business
    DELETED = "deleted"  # deleted from, or expired out of, the quarantine

    @property
    def final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({State.DELIVERED, State.DISCARDED, State.BOUNCED, State.DELETED})
_INITIAL = {
    Outcome.DELIVER: State.PENDING,
    Outcome.QUARANTINE: State.HELD,
    Outcome.DISCARD: State.DISCARDED,
}


@dataclass(frozen=True, slots=True)
class Recipient:
    """One RCPT TO, with the outcome decided for it and the verdicts behind it."""

    address: str
    outcome: Outcome
    verdicts: tuple[Verdict, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "outcome", Outcome(self.outcome))
        object.__setattr__(self, "verdicts", tuple(self.verdicts))

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(v.reason for v in self.verdicts)


@dataclass(frozen=True, slots=True)
class Envelope:
    """The SMTP transaction around a message, as the SMTP layer saw it.

    `received` is the time of end of DATA (seconds since the epoch, from the
    caller's clock); `mail_options` are the ESMTP MAIL parameters delivery
    must honour (``SMTPUTF8``, ``BODY=8BITMIME``).
    """

    received: float
    client_ip: str
    helo: str
    mail_from: str
    recipients: tuple[Recipient, ...]
    tenant: str = ""
    mail_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "recipients", tuple(self.recipients))
        object.__setattr__(self, "mail_options", tuple(self.mail_options))
        if not self.recipients:
            raise ValueError("an envelope has at least one recipient")


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """A recipient and where it stands; `at` is None until it was first marked."""

    index: int
    recipient: Recipient
    state: State
    detail: str = ""
    at: float | None = None


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    """A message as loaded: envelope, data size, recipients' states.

    The data stays on disk; `open` and `chunks` read it in bounded pieces.
    """

    queue_id: QueueId
    envelope: Envelope
    size: int
    recipients: tuple[RecipientStatus, ...]
    path: Path
    _data_offset: int = field(repr=False)

    @property
    def pending(self) -> tuple[RecipientStatus, ...]:
        """Recipients not yet final (to deliver, deferred or held)."""
        return tuple(r for r in self.recipients if not r.state.final)

    def open(self) -> io.BufferedReader:
        """The message data as a read-only, seekable binary file; close it."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MessageNotFoundError(f"{self.queue_id}: removed from the spool") from None
        except OSError as e:
            raise SpoolError(f"opening {self.path}: {e.strerror}") from e
        end = self._data_offset + self.size
        if os.fstat(fd).st_size != end + END_SIZE:
            os.close(fd)
            raise CorruptMessageError(f"{self.path}: changed size since it was loaded")
        return io.BufferedReader(_Window(fd, self._data_offset, end), FLUSH_SIZE)

    def chunks(self, size: int = FLUSH_SIZE) -> Iterator[bytes]:
        """The message data in pieces of at most `size` bytes."""
        with self.open() as f:
            while chunk := f.read(size):
                yield chunk

    def read_bytes(self) -> bytes:
        """The whole data at once: for small messages and tests only."""
        with self.open() as f:
            return f.read()


@dataclass(frozen=True, slots=True)
class Recovery:
    """What `Spool.recover` found; every list is in arrival (queue id) order."""

    pending: tuple[QueueId, ...]  # intact, a recipient not final: hand to queue/quarantine
    finished: tuple[QueueId, ...]  # intact, every recipient final: removed now
    corrupt: tuple[tuple[str, str], ...]  # (file name, why), moved to corrupt/
    unacknowledged: tuple[str, ...]  # tmp/ leftovers, never answered 250: removed
    skipped: tuple[tuple[str, str], ...]  # (file name, why), left where they are


# ---------------------------------------------------------------- queue ids

# Crockford's base32 in lower case: digits sort before letters in ASCII, so
# the ids sort as their numbers do; no i, l, o, u to misread; one case, so
# case-insensitive filesystems are safe.
_B32 = "0123456789abcdefghjkmnpqrstvwxyz"
_QUEUE_ID = re.compile(r"[0-9a-hjkmnp-tv-z]{19}")


def _b32(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_B32[n & 31])
        n >>= 5
    return "".join(reversed(out))


class _IdMaker:
    """Queue ids: 11 digits of microseconds since the epoch, 8 of randomness.

    Strictly increasing within a process even when the clock steps back;
    the 40 random bits keep worker processes apart. Never derived from
    anything the client sent.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last = 0
        self._lock = threading.Lock()

    def __call__(self) -> QueueId:
        us = int(self._clock() * 1_000_000)
        with self._lock:
            us = max(us, self._last + 1)
            self._last = us
        return QueueId(_b32(us, 11) + _b32(secrets.randbits(40), 8))


def is_queue_id(text: str) -> bool:
    """Whether ``text`` has the form of a queue id (and so names no path)."""
    return _QUEUE_ID.fullmatch(text) is not None


def _check_id(queue_id: str) -> QueueId:
    # Ids arrive from the CLI and the web UI too: never let one name a path.
    if not isinstance(queue_id, str) or not _QUEUE_ID.fullmatch(queue_id):
        raise MessageNotFoundError(f"{queue_id!r} is not a queue id")
    return QueueId(queue_id)


# ---------------------------------------------------------------- file system


@contextmanager
def _os_errors(what: str, path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno in _FULL:
            raise SpoolFullError(
                f"spool full: {what} {path}: {e.strerror}; free space on that filesystem"
            ) from e
        raise SpoolError(f"{what} {path}: {e.strerror or e}") from e


def _fsync_dir(path: Path) -> None:
    with _os_errors("syncing directory", path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _free_bytes(path: Path) -> int:
    with _os_errors("statvfs", path):
        st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class _Window(io.RawIOBase):
    """Bytes [start, end) of an open file, read with pread; owns the fd."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        super().__init__()
        self._fd, self._start, self._end, self._pos = fd, start, end, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        want = min(len(b), self._end - self._start - self._pos)
        if want <= 0:
            return 0
        got = os.pread(self._fd, want, self._start + self._pos)
        b[: len(got)] = got
        self._pos += len(got)
        return len(got)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._end - self._start}
        self._pos = max(0, base[whence] + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


# ---------------------------------------------------------------- envelope JSON


def _verdict_json(v: Verdict) -> dict[str, Any]:
    reply = None if v.reply is None else [v.reply.code, v.reply.status, v.reply.text]
    return {
        "layer": v.layer.value,
        "action": v.action.value,
        "reason": v.reason,
        "detail": v.detail,
        "reply": reply,
        "shadow": v.shadow,
    }


def _envelope_json(queue_id: QueueId, env: Envelope) -> bytes:
    obj = {
        "queue_id": queue_id,
        "received": env.received,
        "client_ip": env.client_ip,
        "helo": env.helo,
        "mail_from": env.mail_from,
        "tenant": env.tenant,
        "mail_options": list(env.mail_options),
        "recipients": [
            {
                "address": r.address,
                "outcome": r.outcome.value,
                "verdicts": [_verdict_json(v) for v in r.verdicts],
            }
            for r in env.recipients
        ],
    }
    # ensure_ascii: every str round-trips exactly, lone surrogates from a
    # surrogateescape'd client string included, and no byte is a newline.
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()


def _want(obj: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    v = obj[key]
    if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
        raise TypeError(f"{key}: {type(v).__name__}")
    return v


def _parse_envelope(raw: bytes) -> tuple[str, Envelope]:
    """The queue id and envelope in `raw`; ValueError/TypeError/KeyError if not."""
    obj = json.loads(raw)
    recipients = []
    for r in _want(obj, "recipients", list):
        verdicts = []
        for v in _want(r, "verdicts", list):
            reply = _want(v, "reply", (list, type(None)))
            verdicts.append(
                Verdict(
                    layer=Layer(_want(v, "layer", str)),
                    action=Action(_want(v, "action", str)),
                    reason=_want(v, "reason", str),
                    detail=_want(v, "detail", str),
                    reply=None if reply is None else SmtpReply(*reply),
                    shadow=_want(v, "shadow", bool),
                )
            )
        recipients.append(
            Recipient(_want(r, "address", str), Outcome(_want(r, "outcome", str)), tuple(verdicts))
        )
    options = _want(obj, "mail_options", list)
    if not all(isinstance(o, str) for o in options):
        raise TypeError("mail_options")
    env = Envelope(
        received=float(_want(obj, "received", (int, float))),
        client_ip=_want(obj, "client_ip", str),
        helo=_want(obj, "helo", str),
        mail_from=_want(obj, "mail_from", str),
        recipients=tuple(recipients),
        tenant=_want(obj, "tenant", str),
        mail_options=tuple(options),
    )
    return _want(obj, "queue_id", str), env


def _header(queue_id: QueueId, env: Envelope) -> bytes:
    js = _envelope_json(queue_id, env)
    return b"%s%d\nENVELOPE %d\n%s\nDATA\n" % (MAGIC, VERSION, len(js), js)


# ---------------------------------------------------------------- reading a message file


@dataclass(frozen=True, slots=True)
class _Parsed:
    envelope: Envelope
    data_offset: int
    size: int


def _read_message(path: Path, queue_id: QueueId, *, verify: bool) -> _Parsed:
    """Parse (and with `verify`, checksum) one message file, or raise why not."""
    try:
        f = open(path, "rb")  # noqa: SIM115 -- closed below, on every path
    except FileNotFoundError:
        raise MessageNotFoundError(f"{queue_id}: not in the spool") from None
    except OSError as e:
        raise SpoolError(f"opening {path}: {e.strerror}") from e
    with f:
        try:
            return _parse_open(f, path, queue_id, verify)
        except OSError as e:
            raise SpoolError(f"reading {path}: {e.strerror}") from e


def _parse_open(f: io.BufferedReader, path: Path, queue_id: QueueId, verify: bool) -> _Parsed:
    def torn(why: str) -> CorruptMessageError:
        return CorruptMessageError(f"{path.name}: {why}")

    total = os.fstat(f.fileno()).st_size
    magic = f.readline(64)
    if not magic.startswith(MAGIC):
        raise torn("no spool header")
    version = magic[len(MAGIC) :].rstrip(b"\n")
    if not magic.endswith(b"\n") or not version.isdigit():
        raise torn("damaged spool header")
    if int(version) != VERSION:
        raise UnsupportedVersionError(
            f"{path.name}: spool format {int(version)}, this kithmail reads {VERSION}; "
            "run the kithmail that wrote it"
        )
    m = re.fullmatch(rb"ENVELOPE (\d{1,9})\n", f.readline(32))
    if not m or int(m.group(1)) > _MAX_ENVELOPE:
        raise torn("damaged envelope record")
    raw = f.read(int(m.group(1)))
    if len(raw) != int(m.group(1)) or f.read(6) != b"\nDATA\n":
        raise torn("truncated in the envelope")
    data_offset = f.tell()
    if total < data_offset + END_SIZE:
        raise torn("truncated: no end record")
    f.seek(total - END_SIZE)
    end = _END.fullmatch(f.read(END_SIZE))
    if not end:
        raise torn("no end record (torn write)")
    if int(end.group(1), 16) != total - END_SIZE:
        raise torn(f"length {int(end.group(1), 16)} in the end record, {total - END_SIZE} on disk")
    if verify:
        f.seek(0)
        sha = hashlib.sha256()
        left = total - END_SIZE
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                raise torn("shrank while being read")
            sha.update(chunk)
            left -= len(chunk)
        if sha.hexdigest().encode() != end.group(2):
            raise torn("checksum mismatch (damaged on disk)")
    try:
        qid, env = _parse_envelope(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise torn(f"bad envelope: {e!r}") from None
    if qid != queue_id:
        raise torn(f"holds queue id {qid!r}")
    return _Parsed(env, data_offset, total - END_SIZE - data_offset)


# ---------------------------------------------------------------- state records


def _state_line(index: int, state: State, at: float, detail: str) -> bytes:
    js = json.dumps(
        {"r": index, "s": state.value, "t": at, "d": detail},
        ensure_ascii=True,
        separators=(",", ":"),
        allow_nan=False,
    ).encode()
    return b"%08x %s\n" % (zlib.crc32(js), js)


def _read_states(path: Path, recipients: tuple[Recipient, ...]) -> tuple[RecipientStatus, ...]:
    current = [RecipientStatus(i, r, _INITIAL[r.outcome]) for i, r in enumerate(recipients)]
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return tuple(current)
    except OSError as e:
        raise SpoolError(f"reading {path}: {e.strerror}") from e
    # The piece after the last newline is a torn append, never a record.
    for line in raw.split(b"\n")[:-1]:
        m = re.fullmatch(rb"([0-9a-f]{8}) (\{.*\})", line)
        if not m or zlib.crc32(m.group(2)) != int(m.group(1), 16):
            if line:
                log.warning("%s: ignoring a damaged state record", path.name)
            continue
        try:
            rec = json.loads(m.group(2))
            i, state = _want(rec, "r", int), State(_want(rec, "s", str))
            at, detail = float(_want(rec, "t", (int, float))), _want(rec, "d", str)
        except (ValueError, TypeError, KeyError):
            log.warning("%s: ignoring an unreadable state record", path.name)
            continue
        if 0 <= i < len(current) and not current[i].state.final:
            current[i] = RecipientStatus(i, current[i].recipient, state, detail, at)
    return tuple(current)


# ---------------------------------------------------------------- writing a message file


class _Writer:
    """One message on its way from tmp/ to active/.

    Every method takes the lock, so `undo`, run after a cancelled caller
    stopped waiting, follows whatever thread was still writing instead of
    closing the fd under it.
    """

    def __init__(self, spool: Spool, queue_id: QueueId, head: bytes, reserve: int) -> None:
        self._root = spool.root
        self._tmp = spool.root / "tmp" / queue_id
        self._active = spool.root / "active" / f"{queue_id}.msg"
        self._head = head
        self._reserve = reserve
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._created = False  # tmp/ file exists
        self._placed = False  # renamed into active/
        self._undone = False  # given up: every later call refuses
        self._buf = bytearray()
        self._sha = hashlib.sha256()
        self._length = 0

    def open(self, expected: int) -> None:
        with self._lock:
            self._check_live()
            if self._reserve:
                free = _free_bytes(self._root)
                if free - expected - len(self._head) < self._reserve:
                    raise self._refuse(free)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            with _os_errors("creating", self._tmp):
                self._fd = os.open(self._tmp, flags, 0o600)
            self._created = True
            self._write(self._head)

    def would_block(self, chunk: Chunk) -> bool:
        return len(self._buf) + len(chunk) >= FLUSH_SIZE

    def feed(self, chunk: Chunk) -> None:
        with self._lock:
            self._check_live()
            if not self.would_block(chunk):
                self._buf += chunk
                return
            if self._buf:
                self._write(self._buf)
                self._buf = bytearray()
            if len(chunk) >= FLUSH_SIZE:
                self._write(chunk)  # a big chunk goes straight out, never copied
            else:
                self._buf += chunk

    def finish(self) -> None:
        """Seal, fsync, rename into active/ and fsync the directory: one message alone."""
        self.seal()
        with self._lock:
            self._check_live()
            assert self._fd is not None
            with _os_errors("syncing", self._tmp):
                os.fsync(self._fd)
        self.place()
        _fsync_dir(self._active.parent)

    def seal(self) -> None:
        """Write what is buffered and the end record; nothing is synced yet."""
        with self._lock:
            self._check_live()
            assert self._fd is not None
            if self._buf:
                self._write(self._buf)
                self._buf = bytearray()
            end = b"END %016x %s\n" % (self._length, self._sha.hexdigest().encode())
            self._write(end, hashed=False)

    def place(self) -> None:
        """Close and rename into active/: only after the data is on disk."""
        with self._lock:
            self._check_live()
            assert self._fd is not None
            fd, self._fd = self._fd, None
            with _os_errors("closing", self._tmp):
                os.close(fd)
            with _os_errors("renaming into active/", self._tmp):
                os.rename(self._tmp, self._active)
            self._created, self._placed = False, True

    def fileno(self) -> int | None:
        return self._fd

    def undo(self) -> None:
        """Leave nothing of a message whose queue id the caller never received.

        Before the rename that is the temp file; after it, the file in
        active/ (also when finish completed for a caller that was cancelled
        meanwhile: nobody answered 250 for it).
        """
        with self._lock:
            if self._fd is not None:
                with suppress(OSError):
                    os.close(self._fd)
                self._fd = None
            for path, there in ((self._tmp, self._created), (self._active, self._placed)):
                if not there:
                    continue
                try:
                    path.unlink()
                    if path is self._active:
                        _fsync_dir(path.parent)
                except FileNotFoundError:
                    pass
                except (OSError, SpoolError) as e:
                    # Left in active/ it is delivered: a duplicate, never a loss.
                    log.error("could not remove unacknowledged %s: %s", path, e)
            self._created = self._placed = False
            self._undone = True

    def _check_live(self) -> None:
        if self._undone:
            raise SpoolError(f"{self._tmp.name}: accept was abandoned")

    def _write(self, b: Chunk, hashed: bool = True) -> None:
        assert self._fd is not None
        if self._reserve:
            free = _free_bytes(self._root)
            if free - len(b) < self._reserve:
                raise self._refuse(free)
        view = memoryview(b).cast("B")
        if hashed:
            self._sha.update(view)
            self._length += len(view)
        with _os_errors("writing", self._tmp):
            while view:
                view = view[os.write(self._fd, view) :]

    def _refuse(self, free: int) -> SpoolFullError:
        return SpoolFullError(
            f"spool full: {free} bytes free on the filesystem of {self._root}, and "
            f"{self._reserve} are kept in reserve; free space or lower the reserve"
        )


def _bytes_like(data: object) -> bool:
    return isinstance(data, bytes | bytearray | memoryview)


def _fill(w: _Writer, data: Chunk | Iterable[Chunk]) -> None:
    w.open(len(data) if isinstance(data, bytes | bytearray | memoryview) else 0)
    for chunk in _sync_chunks(data):
        w.feed(chunk)


def _sync_chunks(data: Chunk | Iterable[Chunk]) -> Iterator[Chunk]:
    if isinstance(data, bytes | bytearray | memoryview):
        yield data
        return
    if isinstance(data, str):
        raise TypeError("message data is bytes, not str")
    for chunk in data:
        if not _bytes_like(chunk):
            raise TypeError(f"message data chunks are bytes, not {type(chunk).__name__}")
        yield chunk


# ---------------------------------------------------------------- group commit

# Messages smaller than this are written by the committer thread itself;
# bigger ones are written in a thread of their own first, so that one big
# message does not hold up a batch of small ones.
_INLINE = 256 * 1024


def _small(data: object) -> bool:
    if isinstance(data, bytes | bytearray | memoryview):
        return len(data) <= _INLINE
    if isinstance(data, list | tuple):
        total = 0
        for c in data:
            if not _bytes_like(c):
                return False
            total += len(c)
        return total <= _INLINE
    return False


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast(Callable[[int], int], fn)


_SYNCFS = _load_syncfs()


class _Committer:
    """One thread that makes accepted messages durable in batches (group commit).

    Under load many sessions finish DATA at once; fsyncing each file and the
    directory for each message costs two journal commits per message (about
    6 ms each on the disks we measured). The committer takes every message
    sealed since its last round, makes their data durable with one
    syncfs(2) of the spool's filesystem (one fsync per file where syncfs is
    missing), renames each into active/ and fsyncs the directory once; only
    then are their callers told, and only then is 250 said. A failure fails
    the whole round: no caller is told "done" for data that may not be on
    disk. syncfs also writes back other dirty files of that filesystem,
    which only costs time.
    """

    def __init__(self, active: Path) -> None:
        self._active = active
        self._cond = threading.Condition()
        self._queue: list[tuple[_Writer, Any, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._thread: threading.Thread | None = None
        self.rounds = 0
        self.committed = 0

    def submit(self, w: _Writer, data: Any) -> asyncio.Future[None]:
        """Write (when `data` is not None), seal and commit `w`; the future says when."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._cond:
            self._queue.append((w, data, loop, fut))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="kithmail-spool-commit", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return fut

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                batch, self._queue = self._queue, []
            self._round(batch)

    def _round(
        self, batch: list[tuple[_Writer, Any, asyncio.AbstractEventLoop, asyncio.Future[None]]]
    ) -> None:
        ready = []
        for w, data, loop, fut in batch:
            try:
                if data is not None:
                    _fill(w, data)
                w.seal()
                ready.append((w, loop, fut))
            except BaseException as e:
                _resolve(loop, fut, e)
        if not ready:
            return
        error: BaseException | None = None
        try:
            self._sync([w for w, _, _ in ready])
            placed = []
            for w, loop, fut in ready:
                try:
                    w.place()
                    placed.append((w, loop, fut))
                except BaseException as e:  # undone meanwhile: its caller is gone
                    _resolve(loop, fut, e)
            ready = placed
            _fsync_dir(self._active)
        except BaseException as e:
            error = e
        self.rounds += 1
        self.committed += len(ready) if error is None else 0
        for _, loop, fut in ready:
            _resolve(loop, fut, error)

    def _sync(self, writers: list[_Writer]) -> None:
        fds = [fd for w in writers if (fd := w.fileno()) is not None]
        if _SYNCFS is not None and len(fds) > 1:
            if _SYNCFS(fds[0]) != 0:
                err = ctypes.get_errno()
                raise SpoolError(f"syncing the spool's filesystem: {os.strerror(err)}")
            return
        for fd in fds:
            with _os_errors("syncing", self._active):
                os.fsync(fd)


def _resolve(
    loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None], error: BaseException | None
) -> None:
    def done() -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(None)
        elif isinstance(error, Exception):
            fut.set_exception(error)
        else:
            fut.set_exception(SpoolError(f"interrupted: {error!r}"))

    with suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(done)


# ---------------------------------------------------------------- the spool


class Spool:
    """The spool directory: ``tmp/``, ``active/`` and ``corrupt/`` under `root`.

    `reserve_bytes`: accept() refuses with `SpoolFullError` when it would
    leave less than this free on the filesystem. `clock` gives queue ids
    and state records their time. Every blocking method has an async twin
    that runs it in a thread; the plain names are the async ones.
    """

    def __init__(
        self,
        root: Path,
        *,
        reserve_bytes: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if reserve_bytes < 0:
            raise ValueError("reserve_bytes cannot be negative")
        self.root = Path(root)
        self.reserve_bytes = reserve_bytes
        self._clock = clock
        self._new_id = _IdMaker(clock)
        # Marks of one message are serialised in this process (read the
        # current state, refuse a change to a final one, append); striped
        # so unrelated messages do not wait for each other's fsync.
        self._locks = [threading.Lock() for _ in range(64)]
        self._committer = _Committer(self.root / "active")
        made = False
        for sub in ("", "tmp", "active", "corrupt"):
            d = self.root / sub
            if not d.is_dir():
                with _os_errors("creating", d):
                    d.mkdir(mode=0o700, parents=True, exist_ok=True)
                made = True
        if made:
            _fsync_dir(self.root)
            _fsync_dir(self.root.parent)

    def __repr__(self) -> str:
        return f"Spool({str(self.root)!r}, reserve_bytes={self.reserve_bytes})"

    def _msg(self, queue_id: QueueId) -> Path:
        return self.root / "active" / f"{queue_id}.msg"

    def _state(self, queue_id: QueueId) -> Path:
        return self.root / "active" / f"{queue_id}.state"

    # ------------------------------------------------------------ accept

    async def accept(
        self, envelope: Envelope, data: Data | DataFor, *, reserve_bytes: int | None = None
    ) -> QueueId:
        """Write one message durably and return its queue id; only then say 250.

        `data` is the message as bytes, or an iterable or async iterable of
        byte chunks, streamed to disk. Raises `SpoolFullError` (452 4.3.1)
        or `SpoolError` (451 4.3.0); on any error or cancellation nothing of
        the message is left behind.
        """
        queue_id = self._new_id()
        w = self._writer(queue_id, envelope, reserve_bytes)
        done = False
        if callable(data):  # the data names its queue id (a Received header)
            data = data(queue_id)
        try:
            if isinstance(data, AsyncIterable):
                await asyncio.to_thread(w.open, 0)
                async for chunk in data:
                    if not _bytes_like(chunk):
                        raise TypeError(
                            f"message data chunks are bytes, not {type(chunk).__name__}"
                        )
                    if w.would_block(chunk):
                        await asyncio.to_thread(w.feed, chunk)
                    else:
                        w.feed(chunk)
                await self._committer.submit(w, None)
            elif _small(data):
                await self._committer.submit(w, data)
            else:
                await asyncio.to_thread(_fill, w, data)
                await self._committer.submit(w, None)
            done = True
            return queue_id
        finally:
            if not done:
                # A cancelled await leaves its thread running: undo in a
                # thread too, behind the writer's lock, and shield it so a
                # second cancellation cannot skip the clean-up. If finish
                # got as far as active/, the id was never returned, so the
                # message is withdrawn.
                await asyncio.shield(asyncio.ensure_future(asyncio.to_thread(w.undo)))

    def accept_sync(
        self,
        envelope: Envelope,
        data: Chunk | Iterable[Chunk] | Callable[[str], Chunk | Iterable[Chunk]],
        *,
        reserve_bytes: int | None = None,
    ) -> QueueId:
        """`accept` for a thread of its own (blocks on disk I/O)."""
        queue_id = self._new_id()
        w = self._writer(queue_id, envelope, reserve_bytes)
        done = False
        if callable(data):
            data = data(queue_id)
        try:
            _fill(w, data)
            w.finish()
            done = True
            return queue_id
        finally:
            if not done:
                w.undo()

    def _writer(self, queue_id: QueueId, envelope: Envelope, reserve: int | None) -> _Writer:
        if not isinstance(envelope, Envelope):
            raise TypeError("accept() takes an Envelope")
        reserve = self.reserve_bytes if reserve is None else reserve
        return _Writer(self, queue_id, _header(queue_id, envelope), reserve)

    # ------------------------------------------------------------ load, mark, remove

    async def load(self, queue_id: str, *, verify: bool = True) -> SpooledMessage:
        return await asyncio.to_thread(self.load_sync, queue_id, verify=verify)

    def load_sync(self, queue_id: str, *, verify: bool = True) -> SpooledMessage:
        """The message's envelope and recipients' states; the data stays on disk.

        With `verify` (the default) the checksum is checked, reading the
        file once; without, only its structure and length.
        """
        qid = _check_id(queue_id)
        p = _read_message(self._msg(qid), qid, verify=verify)
        states = _read_states(self._state(qid), p.envelope.recipients)
        return SpooledMessage(qid, p.envelope, p.size, states, self._msg(qid), p.data_offset)

    async def mark(self, queue_id: str, rcpt_index: int, state: State, detail: str = "") -> None:
        await asyncio.to_thread(self.mark_sync, queue_id, rcpt_index, state, detail)

    def mark_sync(self, queue_id: str, rcpt_index: int, state: State, detail: str = "") -> None:
        """Record durably that recipient `rcpt_index` moved to `state`.

        Returns once the record is fsync'd. A final recipient never moves
        again (`StateError`); `SpoolFullError` when the disk is full, and
        the state stays what it was.
        """
        qid = _check_id(queue_id)
        state = State(state)
        with self._locks[hash(qid) % len(self._locks)]:
            p = _read_message(self._msg(qid), qid, verify=False)
            states = _read_states(self._state(qid), p.envelope.recipients)
            if not 0 <= rcpt_index < len(states):
                raise StateError(f"{qid} has no recipient {rcpt_index}")
            if states[rcpt_index].state.final:
                raise StateError(
                    f"{qid} recipient {rcpt_index} is already {states[rcpt_index].state}"
                )
            self._append(self._state(qid), _state_line(rcpt_index, state, self._clock(), detail))

    @staticmethod
    def _append(path: Path, line: bytes) -> None:
        created = False
        with _os_errors("appending to", path):
            try:
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                created = True
            try:
                size = os.fstat(fd).st_size
                # A crash mid-append leaves a line without its newline; start
                # a fresh line so this record is not glued onto the torn one.
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                if created:
                    with suppress(OSError):
                        path.unlink()
                raise
            finally:
                os.close(fd)
        if created:
            _fsync_dir(path.parent)

    async def remove(self, queue_id: str, *, force: bool = False, durable: bool = True) -> None:
        await asyncio.to_thread(self.remove_sync, queue_id, force=force, durable=durable)

    def remove_sync(self, queue_id: str, *, force: bool = False, durable: bool = True) -> None:
        """Remove a message whose every recipient is final (any, with `force`).

        `durable=False` skips the directory fsync: for a message just
        delivered to every recipient, where a crash that forgets the removal
        only means one more delivery (a duplicate RFC 5321 §6.1 allows),
        and the queue saves a journal commit per message.
        """
        qid = _check_id(queue_id)
        with self._locks[hash(qid) % len(self._locks)]:
            if not force:
                p = _read_message(self._msg(qid), qid, verify=False)
                open_ = [
                    s.index
                    for s in _read_states(self._state(qid), p.envelope.recipients)
                    if not s.state.final
                ]
                if open_:
                    raise StateError(f"{qid}: recipients {open_} are not final yet")
            # The message first: a crash between the two leaves an orphan
            # state file (recover removes it), never a message whose
            # history is gone and would be delivered again.
            try:
                self._msg(qid).unlink()
            except FileNotFoundError:
                raise MessageNotFoundError(f"{qid}: not in the spool") from None
            except OSError as e:
                raise SpoolError(f"removing {self._msg(qid)}: {e.strerror}") from e
            try:
                self._state(qid).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("%s: state file left behind: %s", qid, e.strerror)
            if durable:
                _fsync_dir(self.root / "active")
            # An admin hold dies with its message (a new id is never reused).
            with suppress(FileNotFoundError):
                (self.root / "hold" / qid).unlink()

    async def queue_ids(self) -> list[QueueId]:
        return await asyncio.to_thread(self.queue_ids_sync)

    def queue_ids_sync(self) -> list[QueueId]:
        """Every message in active/, in arrival order, without reading them."""
        names = os.listdir(self.root / "active")
        return sorted(
            QueueId(n[:-4]) for n in names if n.endswith(".msg") and _QUEUE_ID.fullmatch(n[:-4])
        )

    # ------------------------------------------------------------ admin hold, flush requests
    #
    # Both are plain files, so `kith queue` in another process reaches the
    # running queue through the spool alone: ``hold/<queue id>`` (empty,
    # durable) stops delivery attempts of that message until it is gone;
    # ``flush/<queue id or "all">.<random>`` asks the queue to attempt now,
    # and the queue removes it when it has seen it (not synced: a request
    # lost in a crash only means the next attempt comes on schedule).

    def hold_sync(self, queue_id: str) -> None:
        """Put a message on admin hold: the queue does not attempt it."""
        qid = _check_id(queue_id)
        if not self._msg(qid).exists():
            raise MessageNotFoundError(f"{qid}: not in the spool")
        d = self.root / "hold"
        with _os_errors("creating", d):
            d.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(d / qid, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.close(fd)
        _fsync_dir(d)
        if not self._msg(qid).exists():  # removed meanwhile: leave no orphan
            with suppress(FileNotFoundError):
                (d / qid).unlink()
            raise MessageNotFoundError(f"{qid}: not in the spool")

    def release_sync(self, queue_id: str) -> bool:
        """End an admin hold; False if the message was not held."""
        qid = _check_id(queue_id)
        try:
            (self.root / "hold" / qid).unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise SpoolError(f"releasing {qid}: {e.strerror}") from e
        _fsync_dir(self.root / "hold")
        return True

    def held_sync(self) -> frozenset[QueueId]:
        """The queue ids on admin hold (one listdir of a small directory)."""
        try:
            names = os.listdir(self.root / "hold")
        except FileNotFoundError:
            return frozenset()
        return frozenset(QueueId(n) for n in names if _QUEUE_ID.fullmatch(n))

    def is_held(self, queue_id: str) -> bool:
        return (self.root / "hold" / _check_id(queue_id)).exists()

    def request_flush_sync(self, queue_id: str | None = None) -> None:
        """Ask the running queue to attempt one message (or all) now."""
        name = "all" if queue_id is None else _check_id(queue_id)
        d = self.root / "flush"
        with _os_errors("creating", d):
            d.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(
                d / f"{name}.{secrets.token_hex(6)}",
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                0o600,
            )
            os.close(fd)

    def take_flush_requests_sync(self) -> list[QueueId | None]:
        """The flush requests made so far (None: all), each removed once taken."""
        d = self.root / "flush"
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        taken: list[QueueId | None] = []
        for n in sorted(names):
            stem = n.partition(".")[0]
            with suppress(FileNotFoundError):
                (d / n).unlink()
                if stem == "all":
                    taken.append(None)
                elif _QUEUE_ID.fullmatch(stem):
                    taken.append(QueueId(stem))
        return taken

    # ------------------------------------------------------------ recover

    async def recover(self) -> Recovery:
        return await asyncio.to_thread(self.recover_sync)

    def recover_sync(self) -> Recovery:
        """At start, before any accept: sort out what a crash left behind.

        tmp/ leftovers were never acknowledged and are removed. Every
        message in active/ is checksummed: a torn one is moved, with its
        state file, to corrupt/ and logged; an intact one whose recipients
        are all final is removed (a crash came between the last mark and
        remove); the rest are returned, in arrival order.
        """
        tmp, active, corrupt = self.root / "tmp", self.root / "active", self.root / "corrupt"
        unacked = []
        for name in sorted(os.listdir(tmp)):
            try:
                (tmp / name).unlink()
            except IsADirectoryError:
                log.warning("tmp/%s is a directory, not ours: left alone", name)
                continue
            unacked.append(name)
            log.info("removed tmp/%s: interrupted before it was acknowledged", name)
        if unacked:
            _fsync_dir(tmp)

        pending: list[QueueId] = []
        finished: list[QueueId] = []
        bad: list[tuple[str, str]] = []
        skipped: list[tuple[str, str]] = []
        names = set(os.listdir(active))
        for name in sorted(names):
            stem, _, ext = name.rpartition(".")
            if not _QUEUE_ID.fullmatch(stem) or ext not in ("msg", "state"):
                skipped.append((name, "not a spool file"))
                log.warning("active/%s: not a spool file, left alone", name)
                continue
            qid = QueueId(stem)
            if ext == "state":
                if f"{stem}.msg" not in names:
                    # remove() got as far as the message: finish its work.
                    (active / name).unlink()
                continue
            try:
                msg = self.load_sync(qid, verify=True)
            except UnsupportedVersionError as e:
                skipped.append((name, str(e)))
                log.error("active/%s", e)
                continue
            except CorruptMessageError as e:
                why = str(e).partition(": ")[2]
                bad.append((name, why))
                log.error("active/%s is damaged (%s): moved to corrupt/, not delivered", name, why)
                for n in (name, f"{stem}.state"):
                    if n in names:
                        os.rename(active / n, corrupt / n)
                continue
            if msg.pending:
                pending.append(qid)
            else:
                self.remove_sync(qid)
                finished.append(qid)
        if bad:
            _fsync_dir(corrupt)
            _fsync_dir(active)
        return Recovery(tuple(pending), tuple(finished), tuple(bad), tuple(unacked), tuple(skipped))
