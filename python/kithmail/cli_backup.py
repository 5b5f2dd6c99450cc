"""``kith backup DEST``: a consistent copy of ``data_dir`` while the server runs.

DEST (a new directory, or an empty one) receives the same layout as
``data_dir``, so restoring is: stop the server, put DEST's contents in
place of ``data_dir``, start (docs/backup.md). Each part is copied by the
means that makes it consistent while the server writes:

- ``spool/``: message by message in queue-id order, for each first its
  state file (up to its last whole line: a line being appended is left
  out), then its message file, hard-linked where DEST is on the same
  filesystem (a message file never changes once in ``active/``) or copied.
  A message removed between the two is left out altogether, so a copy
  never holds a state newer than its message, nor a message half written
  (only whole files ever appear in ``active/``). Admin holds of the copied
  messages and ``corrupt/`` come along; ``tmp/`` (never acknowledged) and
  ``flush/`` (requests already on their way) do not.
- ``core/``: `kithmail.Core.copy_to`, LMDB's compacted copy of one read
  transaction; the server's writers go on meanwhile.
- ``kithmail.db``: SQLite's online backup API in one step (one read
  snapshot of the WAL database), then ``PRAGMA integrity_check`` on the
  copy.
- every other file and directory under ``data_dir`` (``sav.key``,
  ``dkim/``, ``tls/``, and whatever a later kithmail keeps there), file by
  file, except what a restore must not bring back: ``metrics/`` (rebuilt at
  start), ``test-clock`` (the test hook), the database's ``-wal``/``-shm``
  (inside the backup already), and a ``[domains] downstream`` Maildir under
  ``data_dir`` (mailboxes, not the gateway's state).

The parts are taken one after the other, spool first and database last, so
each is consistent in itself, not all at one instant: a message accepted
meanwhile may be in one part and not another, which the start after a
restore reconciles (the quarantine index is rebuilt from the spool). Last,
``kithmail-backup.json`` records what was copied; a DEST without it is
not a finished backup. On failure what was written is removed and the exit
status is 1.

Trusts its operator and the files in ``data_dir`` (they are ours); checks
that DEST is empty and outside ``data_dir`` before writing anything.
Standards: SQLite's backup API (https://sqlite.org/backup.html), LMDB's
``mdb_env_copy2``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import sqlite3
import stat
import time
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kithmail import Core, CoreError, __version__, config
from kithmail.cli import CommandError

MANIFEST = "kithmail-backup.json"
# Under data_dir, never copied: rebuilt at start, the test hook, or inside
# the database's own backup.
_NOT_STATE = frozenset({"metrics", "test-clock", "test-clock.tmp", MANIFEST})
# Copied by their own means above (the database's -wal and -shm are in its copy).
_DONE = frozenset(
    {"kithmail.db", "kithmail.db-wal", "kithmail.db-shm", "kithmail.db-journal", "core", "spool"}
)
# A queue id as kithmail.spool spells them: only those files are messages.
_QUEUE_ID = re.compile(r"[0-9a-hjkmnp-tv-z]{19}")
# A hard link is refused across filesystems, by some filesystems, and by
# protected_hardlinks for files of another user: then copy.
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES})


@dataclass
class Report:
    """What a backup copied: for the output lines and the manifest."""

    messages: int = 0
    linked: int = 0
    spool_bytes: int = 0
    core_bytes: int = 0
    db_bytes: int = 0
    other_bytes: int = 0
    others: list[str] = field(default_factory=list)
    not_copied: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.spool_bytes + self.core_bytes + self.db_bytes + self.other_bytes


def _mib(n: int) -> str:
    if n < 1 << 20:
        return f"{n / 1024:.0f} KiB"
    return f"{n / (1 << 20):.1f} MiB"


def _owned_like(src: os.stat_result, dst: Path) -> None:
    # Run as root, the copy keeps the owner of the original (kithmail:kithmail),
    # so a restore with cp -a needs no chown.
    if os.geteuid() == 0:
        os.lchown(dst, src.st_uid, src.st_gid)


def _owned_as_data_dir(data_dir: Path, paths: list[Path]) -> None:
    """What the backup made itself (directories, the core's and database's copies)."""
    st = data_dir.stat()
    for p in paths:
        _owned_like(st, p)


def _copy_file(src: Path, dst: Path) -> int:
    """A plain copy with mode and times; its size."""
    shutil.copy2(src, dst, follow_symlinks=False)
    st = src.lstat()
    _owned_like(st, dst)
    return st.st_size


def _mkdir_like(src: Path, dst: Path) -> None:
    dst.mkdir(mode=0o700)
    st = src.stat()
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    _owned_like(st, dst)


# ---------------------------------------------------------------- the spool


def _copy_state(src: Path, dst: Path) -> int:
    """The state file up to its last newline (a line being appended is left out)."""
    with src.open("rb") as f:
        data = f.read()
        st = os.fstat(f.fileno())
    whole = data[: data.rfind(b"\n") + 1]
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(whole)
    _owned_like(st, dst)
    return len(whole)


def _link_or_copy(src: Path, dst: Path, link: bool) -> tuple[int, bool]:
    if link:
        try:
            os.link(src, dst, follow_symlinks=False)
            return src.stat().st_size, True
        except OSError as e:
            if e.errno not in _NO_LINK:
                raise
    return _copy_file(src, dst), False


def _backup_spool(src: Path, dst: Path, report: Report, *, link: bool) -> None:
    dst.mkdir(mode=0o700)
    for sub in ("tmp", "active", "corrupt"):
        (dst / sub).mkdir(mode=0o700)
    if not (src / "active").is_dir():
        return  # a server that never started: nothing spooled yet
    stems = sorted(
        {
            stem
            for name in os.listdir(src / "active")
            for stem, _, ext in [name.rpartition(".")]
            if ext in ("msg", "state") and _QUEUE_ID.fullmatch(stem)
        }
    )
    copied: set[str] = set()
    for qid in stems:
        a, b = src / "active", dst / "active"
        # The state before the message: the spool removes a finished message
        # before its state file, and a state copied first is never newer
        # than the message copied after it.
        state_bytes = 0
        # No state file: no recipient marked yet, every one in its first state.
        with suppress(FileNotFoundError):
            state_bytes = _copy_state(a / f"{qid}.state", b / f"{qid}.state")
        try:
            size, linked = _link_or_copy(a / f"{qid}.msg", b / f"{qid}.msg", link)
        except FileNotFoundError:
            # Gone meanwhile (delivered, deleted): not in the backup at all.
            (b / f"{qid}.state").unlink(missing_ok=True)
            continue
        copied.add(qid)
        report.messages += 1
        report.linked += linked
        report.spool_bytes += size + state_bytes
    if (src / "hold").is_dir():
        (dst / "hold").mkdir(mode=0o700)
        for name in os.listdir(src / "hold"):
            if name in copied:
                (dst / "hold" / name).touch(mode=0o600)
    if (src / "corrupt").is_dir():
        for name in sorted(os.listdir(src / "corrupt")):
            p = src / "corrupt" / name
            if p.is_file() and not p.is_symlink():
                report.spool_bytes += _copy_file(p, dst / "corrupt" / name)


# ---------------------------------------------------------------- core and database


def _backup_core(settings: config.Settings, dst: Path, report: Report) -> None:
    live = settings.core_dir
    try:
        # Prefix lengths as stored: a backup never fails over the config.
        core = Core(
            str(live),
            map_size=settings.server.core_map_size,
            ipv4_prefix=None,
            ipv6_prefix=None,
        )
    except CoreError as e:
        raise CommandError(f"opening the core {live}: {e}") from None
    try:
        core.copy_to(str(dst), compact=True)
    except CoreError as e:
        raise CommandError(str(e)) from None  # "cannot copy the core: LMDB: ..."
    finally:
        core.close()
    report.core_bytes = (dst / "data.mdb").stat().st_size


def _backup_database(src: Path, dst: Path, report: Report) -> None:
    try:
        # Opened read-write (a WAL reader needs the -shm), written never.
        live = sqlite3.connect(src, timeout=30)
        try:
            copy = sqlite3.connect(dst)
            try:
                live.backup(copy)  # every page in one step: one read snapshot
                (check,) = copy.execute("PRAGMA integrity_check").fetchone()
            finally:
                copy.close()
        finally:
            live.close()
    except sqlite3.Error as e:
        raise CommandError(f"copying the database {src}: {e}") from None
    if check != "ok":
        raise CommandError(f"the copy of {src} fails its integrity check: {check}")
    report.db_bytes = dst.stat().st_size


# ---------------------------------------------------------------- the rest


def _maildir_inside(settings: config.Settings, data_dir: Path) -> str | None:
    """The top-level name under data_dir of a Maildir downstream, if it is there."""
    scheme, _, where = settings.domains.downstream.partition(":")
    if scheme != "maildir":
        return None
    try:
        rel = Path(where).resolve().relative_to(data_dir)
    except ValueError:
        return None
    return rel.parts[0] if rel.parts else None


def _copy_tree(src: Path, dst: Path) -> int:
    """A directory, file by file (symlinks as links, sockets and pipes left out)."""
    _mkdir_like(src, dst)
    total = 0
    for p in sorted(src.iterdir()):
        st = p.lstat()
        if stat.S_ISDIR(st.st_mode):
            total += _copy_tree(p, dst / p.name)
        elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
            total += _copy_file(p, dst / p.name)
    return total


def _backup_others(settings: config.Settings, data_dir: Path, dest: Path, report: Report) -> None:
    skip = set(_NOT_STATE)
    if (mail := _maildir_inside(settings, data_dir)) is not None:
        skip.add(mail)
    for p in sorted(data_dir.iterdir()):
        if p.name in _DONE:
            continue
        st = p.lstat()
        if p.name in skip or not (
            stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)
        ):
            report.not_copied.append(p.name + ("/" if stat.S_ISDIR(st.st_mode) else ""))
            continue
        if stat.S_ISDIR(st.st_mode):
            report.other_bytes += _copy_tree(p, dest / p.name)
            report.others.append(p.name + "/")
        else:
            report.other_bytes += _copy_file(p, dest / p.name)
            report.others.append(p.name)


# ---------------------------------------------------------------- the command


def _check_target(data_dir: Path, dest: Path) -> bool:
    """Refuse an unusable DEST; True when it must be created."""
    if dest == data_dir or data_dir in dest.parents:
        raise CommandError(f"{dest} is inside the data_dir {data_dir}: back up elsewhere")
    if dest.is_dir():
        if any(dest.iterdir()):
            raise CommandError(f"{dest} is not empty: back up into a new or empty directory")
        return False
    if dest.exists() or dest.is_symlink():
        raise CommandError(f"{dest} is not a directory: back up into a new or empty directory")
    if not dest.parent.is_dir():
        raise CommandError(f"{dest.parent} does not exist: make it first")
    return True


def backup(settings: config.Settings, dest: Path, *, link: bool = True) -> tuple[Report, float]:
    """Copy the server's data_dir into `dest`; the report and the seconds it took."""
    data_dir = settings.server.data_dir.resolve()
    dest = dest.absolute()
    missing = [n for n in ("kithmail.db", "core/data.mdb") if not (data_dir / n).is_file()]
    if missing:
        raise CommandError(
            f"{data_dir} is not a kithmail data_dir (no {', '.join(missing)}); "
            "give -c FILE or --data-dir"
        )
    create = _check_target(data_dir, dest.resolve())
    started, t0 = time.time(), time.monotonic()
    if create:
        dest.mkdir(mode=0o700)
    report = Report()
    try:
        _backup_spool(data_dir / "spool", dest / "spool", report, link=link)
        _backup_core(settings, dest / "core", report)
        _backup_database(data_dir / "kithmail.db", dest / "kithmail.db", report)
        _backup_others(settings, data_dir, dest, report)
        spool = dest / "spool"
        made = [spool, *(p for p in spool.iterdir() if p.is_dir())]
        made += [*(spool / "hold").iterdir()] if (spool / "hold").is_dir() else []
        made += [dest / "core", dest / "core" / "data.mdb", dest / "kithmail.db"]
        _owned_as_data_dir(data_dir, [dest, *made] if create else made)
        os.sync()  # the copies on disk before the manifest says they are there
        seconds = time.monotonic() - t0
        manifest: dict[str, Any] = {
            "kithmail": __version__,
            "data_dir": str(data_dir),
            "started": datetime.fromtimestamp(started, tz=UTC).isoformat(timespec="seconds"),
            "seconds": round(seconds, 3),
            "bytes": report.total,
            "messages": report.messages,
            "copied": ["spool/", "core/", "kithmail.db", *report.others],
            "not_copied": report.not_copied,
        }
        tmp = dest / f"{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.replace(dest / MANIFEST)
    except BaseException:
        if create:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for p in list(dest.iterdir()):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        raise
    return report, seconds


def cmd_backup(args: argparse.Namespace, settings: config.Settings) -> int:
    dest = Path(args.dest)
    try:
        report, seconds = backup(settings, dest, link=not args.no_link)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise CommandError(
            f"backup failed, nothing left in {dest}: {where}{e.strerror or e}"
        ) from None
    except CommandError as e:
        raise CommandError(f"backup failed, nothing left in {dest}: {e}") from None
    linked = f", {report.linked} hard-linked" if report.linked else ""
    print(f"spool: {report.messages} messages, {_mib(report.spool_bytes)}{linked}")
    print(f"core: {_mib(report.core_bytes)} (compacted)")
    print(f"database: {_mib(report.db_bytes)}, integrity ok")
    if report.others:
        print(f"also: {', '.join(report.others)}")
    if report.not_copied:
        print(f"not copied: {', '.join(report.not_copied)}")
    print(f"backup in {dest}: {_mib(report.total)} in {seconds:.2f} s")
    return 0


def add_commands(
    commands: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """Add ``kith backup DEST`` to the ``kith`` parser."""
    help_ = "Copy data_dir consistently into DEST while the server runs."
    p: argparse.ArgumentParser = commands.add_parser(
        "backup",
        help=help_,
        description=help_ + " DEST is a new or empty directory; it gets data_dir's layout "
        "(spool/, core/, kithmail.db, keys) and kithmail-backup.json last. To restore: stop "
        "the server, put DEST's contents in place of data_dir, start (docs/backup.md).",
        parents=[common],
    )
    p.add_argument("dest", metavar="DEST")
    p.add_argument(
        "--no-link",
        action="store_true",
        help="copy message files even where a hard link would do (DEST on the same filesystem)",
    )
    p.set_defaults(standalone=cmd_backup, handler=None, parser=p, check=None)
