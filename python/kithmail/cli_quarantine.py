"""``kith quarantine …``: users' held mail from the shell, while the server runs.

``kith quarantine list USER [--sender TEXT] [--subject TEXT] [--limit N]
[--offset N] [--json]`` pages through a user's quarantine, newest first;
``show QUEUE_ID [INDEX] [--json]`` shows one held copy (or every held copy of
a message): envelope, verdicts and header block; ``release QUEUE_ID INDEX
[--admin]`` delivers a copy to its original recipient now (mail held by the
anti-virus layer needs ``--admin``); ``delete QUEUE_ID INDEX`` deletes it;
``sweep`` runs retention to the end (the server also sweeps, incrementally);
``allow QUEUE_ID INDEX [--list] [--admin]`` adds the copy's sender (with
``--list``, its ``list:<List-Id>``) to the user's community and releases
every copy that sender has held for the user; ``block QUEUE_ID INDEX
[--admin]`` adds the sender to the user's block list and deletes them.
``allow`` and ``block`` also open the core (``<data_dir>/core``) as ``kith
community`` does; LMDB lets them do so while the server has it open.

These open the same spool (``<data_dir>/spool``) and database
(``<data_dir>/kithmail.db``) as the server, through `kithmail.quarantine`,
so every rule of the quarantine holds here too, and a release reaches the
running queue as a flush request in the spool. Every action is in the audit
log as ``cli:<unix user>``.

Trusts its operator (whoever can read the data directory can read the mail
in it); nothing of a message reaches the terminal unescaped. Errors are one
line on stderr; exit 1 for "not held" or a refused action.
Standards: RFC 8259 (``--json``), ISO 8601 (times, UTC).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from kithmail import config, db
from kithmail._core import Core, CoreError
from kithmail.cli import CommandError, CoreSettings, iso, open_core, table
from kithmail.quarantine import AdminOnlyError, Held, Quarantine, QuarantineError, Shown, Taught
from kithmail.spool import MessageNotFoundError, Spool, SpoolError, State
from kithmail.tenants import Policies

Standalone = Callable[[argparse.Namespace, config.Settings], int]


def actor() -> str:
    """Who runs this command, for the audit log: ``cli:<unix user>``."""
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = f"uid{os.getuid()}"
    return f"cli:{name}"


def _printable(text: str) -> str:
    # Message text came from strangers: never let it drive the terminal.
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


@contextmanager
def open_quarantine(settings: config.Settings) -> Iterator[Quarantine]:
    """The quarantine over the settings' spool and database; errors as CommandError."""
    root = settings.server.data_dir / "spool"
    if not (root / "active").is_dir():
        raise CommandError(f"no spool at {root} (has the server run with this data dir?)")
    try:
        database = db.Database.open(settings.server.data_dir / "kithmail.db")
    except db.DatabaseError as e:
        raise CommandError(str(e)) from None
    try:
        database.sync_domains(settings.domains.local)
        spool = Spool(root)
        yield Quarantine(database, spool, policies=Policies(settings, database.tenant_of))
    except (db.DatabaseError, QuarantineError, SpoolError) as e:
        raise CommandError(str(e)) from None
    finally:
        database.close()


def _doc(h: Held) -> dict[str, Any]:
    d = asdict(h)
    d["held_at"] = iso(h.held_at)
    d["expires_at"] = iso(h.expires_at)
    d["admin_only"] = h.admin_only
    return d


# --- commands --------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace, settings: config.Settings) -> int:
    with open_quarantine(settings) as q:
        filters: dict[str, Any] = {"sender": args.sender, "subject": args.subject}
        total = q.count_sync(args.user, **filters)
        rows = q.list_sync(args.user, **filters, limit=args.limit, offset=args.offset)
    if args.json:
        print(json.dumps([_doc(h) for h in rows], indent=2, ensure_ascii=False))
        return 0
    if rows:
        print(
            table(
                ["ID", "INDEX", "HELD", "SIZE", "SENDER", "SUBJECT", "REASON"],
                [
                    (
                        h.queue_id,
                        h.rcpt_index,
                        iso(h.held_at),
                        h.size,
                        "<" + _printable(h.sender) + ">",
                        _printable(h.subject[:60]),
                        h.reason,
                    )
                    for h in rows
                ],
            )
        )
    shown = f"{args.offset + 1}-{args.offset + len(rows)} of " if rows else ""
    print(f"{shown}{total} held for {args.user}")
    return 0


def _show_one(s: Shown) -> None:
    h = s.held
    pairs = [
        ("queue id", f"{h.queue_id} recipient {h.rcpt_index}"),
        ("user", h.user),
        ("tenant", h.tenant or "-"),
        ("recipient", _printable(s.recipient)),
        ("sender", f"<{_printable(s.mail_from)}>"),
        ("client", f"{_printable(s.client_ip)} (HELO {_printable(s.helo)})"),
        ("from", _printable(h.from_addr) or "-"),
        ("subject", _printable(h.subject) or "-"),
        ("date", _printable(h.date) or "-"),
        ("size", str(h.size)),
        ("held", iso(h.held_at)),
        ("expires", iso(h.expires_at)),
        ("reason", f"{h.layer}: {h.reason}" + (" (admins release it)" if h.admin_only else "")),
        ("detail", _printable(h.detail) or "-"),
    ]
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        print(f"{key.ljust(width)}  {value}")
    print()
    for v in s.verdicts:
        flag = " (shadow)" if v.shadow else ""
        print(f"  {v.layer}: {v.action} {v.reason}{flag}  {_printable(v.detail)}")
    print()
    print("\n".join(_printable(line) for line in s.headers.replace("\r\n", "\n").split("\n")))


def cmd_show(args: argparse.Namespace, settings: config.Settings) -> int:
    with open_quarantine(settings) as q:
        if args.index is not None:
            indexes = [args.index]
        else:
            try:
                msg = q.spool.load_sync(args.queue_id, verify=False)
            except MessageNotFoundError as e:
                raise CommandError(str(e)) from None
            indexes = [r.index for r in msg.recipients if r.state is State.HELD]
            if not indexes:
                raise CommandError(f"{args.queue_id}: nothing of it is held")
        shown = [q.show_sync(args.queue_id, i) for i in indexes]
    if args.json:
        doc = [
            {
                **_doc(s.held),
                "recipient": s.recipient,
                "mail_from": s.mail_from,
                "client_ip": s.client_ip,
                "helo": s.helo,
                "verdicts": [
                    {
                        "layer": str(v.layer),
                        "action": str(v.action),
                        "reason": v.reason,
                        "detail": v.detail,
                        "shadow": v.shadow,
                    }
                    for v in s.verdicts
                ],
                "headers": s.headers,
            }
            for s in shown
        ]
        print(json.dumps(doc if args.index is None else doc[0], indent=2, ensure_ascii=False))
        return 0
    for n, s in enumerate(shown):
        if n:
            print("-" * 72)
        _show_one(s)
    return 0


def cmd_release(args: argparse.Namespace, settings: config.Settings) -> int:
    with open_quarantine(settings) as q:
        try:
            h = q.release_sync(args.queue_id, args.index, actor=actor(), admin=args.admin)
        except AdminOnlyError as e:
            raise CommandError(f"{e} (kith quarantine release --admin)") from None
    print(f"{h.queue_id}/{h.rcpt_index}: released to {h.user}; the queue delivers it now")
    return 0


def cmd_delete(args: argparse.Namespace, settings: config.Settings) -> int:
    with open_quarantine(settings) as q:
        h = q.delete_sync(args.queue_id, args.index, actor=actor())
    print(f"{h.queue_id}/{h.rcpt_index}: deleted from the quarantine of {h.user}")
    return 0


@contextmanager
def open_community(settings: config.Settings) -> Iterator[Core]:
    """The core at ``<data_dir>/core`` (prefix lengths as stored), flushed and closed after."""
    try:
        core = open_core(CoreSettings(data_dir=settings.server.data_dir))
    except CoreError as e:
        raise CommandError(f"opening the core: {e}") from None
    try:
        yield core
        core.flush()
    except CoreError as e:
        raise CommandError(str(e)) from None
    finally:
        core.close()


def _taught(t: Taught, done: str) -> None:
    h = t.copies[0]
    listed = "allow list" if t.kind == "allow" else "block list"
    note = "added to" if t.added else "already on"
    print(f"{_printable(t.entry)}: {note} the {listed} of {h.user}")
    for c in t.copies:
        print(f"{c.queue_id}/{c.rcpt_index}: {done}")


def cmd_allow(args: argparse.Namespace, settings: config.Settings) -> int:
    with open_quarantine(settings) as q, open_community(settings) as core:
        how = q.allow_list_release_sync if args.list else q.allow_release_sync
        try:
            t = how(args.queue_id, args.index, core=core, actor=actor(), admin=args.admin)
        except AdminOnlyError as e:
            raise CommandError(f"{e} (kith quarantine allow --admin)") from None
    _taught(t, "released; the queue delivers it now")
    return 0


def cmd_block(args: argparse.Namespace, settings: config.Settings) -> int:
    with open_quarantine(settings) as q, open_community(settings) as core:
        t = q.block_sync(args.queue_id, args.index, core=core, actor=actor(), admin=args.admin)
    _taught(t, "deleted")
    return 0


def cmd_sweep(args: argparse.Namespace, settings: config.Settings) -> int:
    deleted = removed = 0
    with open_quarantine(settings) as q:
        while True:
            swept = q.sweep_sync(time.time(), args.limit)
            deleted += swept.deleted
            removed += swept.removed
            if not swept.more or not (swept.deleted or swept.removed):
                break
    print(
        f"retention: {deleted} held cop{'y' if deleted == 1 else 'ies'} expired, "
        f"{removed} message(s) removed from the spool"
    )
    return 0


# --- the parsers -----------------------------------------------------------------------------


def _index(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a recipient index: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"not a recipient index: {text!r}")
    return n


def _page(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= n <= 1000:
        raise argparse.ArgumentTypeError("1 to 1000")
    return n


def _offset(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("not negative")
    return n


def add_commands(
    commands: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """Add ``kith quarantine …`` to the ``kith`` parser."""

    def leaf(
        actions: argparse._SubParsersAction[Any], name: str, handler: Standalone, help: str
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(
            name, help=help, description=help, parents=[common]
        )
        p.set_defaults(standalone=handler, handler=None, parser=p, check=None)
        return p

    group = commands.add_parser(
        "quarantine",
        help="users' held mail",
        description="Each user's quarantine: mail held in <data_dir>/spool, listed from the "
        "database.",
        parents=[common],
    )
    actions = group.add_subparsers(dest="subcommand", metavar="ACTION", required=True)
    p = leaf(actions, "list", cmd_list, "List a user's held mail, newest first.")
    p.add_argument("user", metavar="USER")
    p.add_argument("--sender", help="only senders (envelope or From) containing this text")
    p.add_argument("--subject", help="only subjects containing this text")
    p.add_argument("--limit", type=_page, default=50, help="at most this many (default 50)")
    p.add_argument("--offset", type=_offset, default=0, help="skip this many first")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = leaf(actions, "show", cmd_show, "Show a held copy: envelope, verdicts, header block.")
    p.add_argument("queue_id", metavar="QUEUE_ID")
    p.add_argument("index", metavar="INDEX", type=_index, nargs="?", help="recipient index")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = leaf(
        actions,
        "release",
        cmd_release,
        "Deliver a held copy to its original recipient now.",
    )
    p.add_argument("queue_id", metavar="QUEUE_ID")
    p.add_argument("index", metavar="INDEX", type=_index, help="recipient index")
    p.add_argument(
        "--admin",
        action="store_true",
        help="act as an admin: needed for mail held by the anti-virus layer",
    )
    p = leaf(actions, "delete", cmd_delete, "Delete a held copy.")
    p.add_argument("queue_id", metavar="QUEUE_ID")
    p.add_argument("index", metavar="INDEX", type=_index, help="recipient index")
    p = leaf(
        actions,
        "allow",
        cmd_allow,
        "Allow a held copy's sender in the user's community and release its held mail.",
    )
    p.add_argument("queue_id", metavar="QUEUE_ID")
    p.add_argument("index", metavar="INDEX", type=_index, help="recipient index")
    p.add_argument(
        "--list", action="store_true", help="allow the message's List-Id instead of its sender"
    )
    p.add_argument(
        "--admin",
        action="store_true",
        help="act as an admin (source admin; needed for mail held by the anti-virus layer)",
    )
    p = leaf(
        actions,
        "block",
        cmd_block,
        "Block a held copy's sender in the user's community and delete its held mail.",
    )
    p.add_argument("queue_id", metavar="QUEUE_ID")
    p.add_argument("index", metavar="INDEX", type=_index, help="recipient index")
    p.add_argument("--admin", action="store_true", help="act as an admin (source admin)")
    p = leaf(actions, "sweep", cmd_sweep, "Delete every held copy past its retention now.")
    p.add_argument("--limit", type=_page, default=1000, help="copies per pass (default 1000)")
