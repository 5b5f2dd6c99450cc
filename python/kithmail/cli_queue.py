"""``kith queue …``: the delivery queue from the shell, while the server runs.

``kith queue list [--json]`` shows every message in the spool with a
recipient not yet final: id, age, size, sender, and each recipient's state
and last reply. ``show ID`` adds the envelope and the message's header
block. ``flush [ID]`` asks for an attempt now, ``hold ID`` / ``release ID``
stop and resume delivery attempts of a message, ``delete ID`` ends its
undelivered recipients (state DELETED, no DSN) and removes it.

How these reach the running queue: only through the spool
(``<data_dir>/spool``), the one thing both processes share. ``hold``
writes ``hold/<id>`` and ``flush`` writes ``flush/<id|all>.<random>``
(see `Spool.hold_sync`, `Spool.request_flush_sync`); the queue reads both
on its next scan, every half second, and a message on hold is never
started (one already in flight finishes). ``delete`` holds the message
first, then marks its recipients in the spool's state file; an attempt
already in flight may still deliver it (its DELIVERED mark then loses to
DELETED — the first final state wins — and a duplicate is possible, never a
loss). Recipients HELD in quarantine are not the queue's: ``delete``
leaves them, and the message stays for ``kith quarantine``.

Trusts its operator; a queue id is checked before it names a file.
Errors are one line on stderr; exit 1 for "not found".
Standards: RFC 8259 (``--json``), ISO 8601 (times, UTC).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kithmail import config
from kithmail.cli import CommandError, table
from kithmail.spool import (
    MessageNotFoundError,
    Spool,
    SpooledMessage,
    SpoolError,
    State,
    StateError,
)

Standalone = Callable[[argparse.Namespace, config.Settings], int]

DELETED_DETAIL = "deleted by an administrator (kith queue delete)"


def spool_root(settings: config.Settings) -> Path:
    return settings.server.data_dir / "spool"


def _spool(settings: config.Settings) -> Spool:
    root = spool_root(settings)
    if not (root / "active").is_dir():
        raise CommandError(f"no spool at {root} (has the server run with this data dir?)")
    try:
        return Spool(root)
    except SpoolError as e:
        raise CommandError(str(e)) from None


def _load(spool: Spool, queue_id: str) -> SpooledMessage:
    try:
        return spool.load_sync(queue_id, verify=False)
    except MessageNotFoundError as e:
        raise CommandError(str(e)) from None
    except SpoolError as e:
        raise CommandError(f"{queue_id}: {e}") from None


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _printable(text: str) -> str:
    # Envelope strings came from SMTP clients: never let one drive the terminal.
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _as_json(msg: SpooledMessage, held: bool, now: float) -> dict[str, Any]:
    env = msg.envelope
    return {
        "queue_id": msg.queue_id,
        "received": _iso(env.received),
        "age_seconds": round(max(0.0, now - env.received), 3),
        "size": msg.size,
        "sender": env.mail_from,
        "held": held,
        "recipients": [
            {
                "address": r.recipient.address,
                "state": r.state.value,
                "detail": r.detail,
                "at": _iso(r.at) if r.at is not None else None,
            }
            for r in msg.recipients
        ],
    }


# --- commands --------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace, settings: config.Settings) -> int:
    root = spool_root(settings)
    if not (root / "active").is_dir():
        messages: list[SpooledMessage] = []
        held: frozenset[str] = frozenset()
    else:
        spool = Spool(root)
        held = spool.held_sync()
        messages = []
        for qid in spool.queue_ids_sync():
            try:
                msg = spool.load_sync(qid, verify=False)
            except MessageNotFoundError:
                continue  # delivered while we looked
            except SpoolError as e:
                print(f"kith: {qid}: {e}", file=sys.stderr)
                continue
            if msg.pending:
                messages.append(msg)
    now = time.time()
    if args.json:
        print(json.dumps([_as_json(m, m.queue_id in held, now) for m in messages], indent=2))
        return 0
    rows: list[list[str]] = []
    for m in messages:
        flag = " (on hold)" if m.queue_id in held else ""
        rows.append(
            [
                m.queue_id + flag,
                _age(now - m.envelope.received),
                str(m.size),
                "<" + _printable(m.envelope.mail_from) + ">",
            ]
        )
        for r in m.recipients:
            rows.append(
                [
                    "",
                    "",
                    r.state.value,
                    "  " + _printable(r.recipient.address) + "  " + _printable(r.detail),
                ]
            )
    if rows:
        print(table(["ID", "AGE", "SIZE", "SENDER / RECIPIENTS"], rows))
    print(f"{len(messages)} message(s) in the queue")
    return 0


def cmd_show(args: argparse.Namespace, settings: config.Settings) -> int:
    from kithmail.queue.dsn import header_block

    spool = _spool(settings)
    msg = _load(spool, args.queue_id)
    env = msg.envelope
    held = spool.is_held(msg.queue_id)
    try:
        headers = header_block(msg)
    except SpoolError as e:
        raise CommandError(str(e)) from None
    if args.json:
        out = _as_json(msg, held, time.time())
        out.update(
            client_ip=env.client_ip,
            helo=env.helo,
            tenant=env.tenant,
            mail_options=list(env.mail_options),
            headers=headers.decode("utf-8", "replace"),
        )
        print(json.dumps(out, indent=2))
        return 0
    pairs = [
        ("queue id", msg.queue_id + (" (on hold)" if held else "")),
        ("received", f"{_iso(env.received)} ({_age(time.time() - env.received)} ago)"),
        ("size", str(msg.size)),
        ("client", f"{_printable(env.client_ip)} (HELO {_printable(env.helo)})"),
        ("sender", f"<{_printable(env.mail_from)}>"),
        ("options", " ".join(env.mail_options) or "-"),
        ("tenant", env.tenant or "-"),
    ]
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        print(f"{k.ljust(width)}  {v}")
    print()
    for r in msg.recipients:
        reasons = ",".join(r.recipient.reasons) or "-"
        print(
            f"  {_printable(r.recipient.address)}  {r.state.value}  {_iso(r.at)}  "
            f"reasons={reasons}  {_printable(r.detail)}"
        )
    print()
    text = headers.decode("utf-8", "replace").replace("\r\n", "\n")
    print(_printable_block(text), end="")
    return 0


def _printable_block(text: str) -> str:
    return "\n".join(_printable(line) for line in text.split("\n"))


def cmd_flush(args: argparse.Namespace, settings: config.Settings) -> int:
    spool = _spool(settings)
    if args.queue_id is not None:
        _load(spool, args.queue_id)
        if spool.is_held(args.queue_id):
            raise CommandError(f"{args.queue_id} is on hold: release it first")
    spool.request_flush_sync(args.queue_id)
    what = args.queue_id or "every message"
    print(f"flush of {what} requested: the running queue attempts it within a second")
    return 0


def cmd_hold(args: argparse.Namespace, settings: config.Settings) -> int:
    spool = _spool(settings)
    try:
        spool.hold_sync(args.queue_id)
    except MessageNotFoundError as e:
        raise CommandError(str(e)) from None
    print(f"{args.queue_id}: on hold (an attempt already in flight still finishes)")
    return 0


def cmd_release(args: argparse.Namespace, settings: config.Settings) -> int:
    spool = _spool(settings)
    _load(spool, args.queue_id)
    if not spool.release_sync(args.queue_id):
        raise CommandError(f"{args.queue_id} is not on hold")
    spool.request_flush_sync(args.queue_id)
    print(f"{args.queue_id}: released, attempted now")
    return 0


def cmd_delete(args: argparse.Namespace, settings: config.Settings) -> int:
    spool = _spool(settings)
    qid = args.queue_id
    msg = _load(spool, qid)
    try:
        spool.hold_sync(qid)  # no new attempt starts while we mark
    except MessageNotFoundError as e:
        raise CommandError(str(e)) from None
    deleted = 0
    try:
        for r in msg.recipients:
            if r.state in (State.PENDING, State.DEFERRED):
                try:
                    spool.mark_sync(qid, r.index, State.DELETED, DELETED_DETAIL)
                    deleted += 1
                except StateError:
                    pass  # became final meanwhile (delivered in flight)
        left = spool.load_sync(qid, verify=False)
        if not left.pending:
            spool.remove_sync(qid)
            print(f"{qid}: deleted ({deleted} recipient(s) never delivered)")
            return 0
    except MessageNotFoundError:
        print(f"{qid}: deleted")
        return 0
    finally:
        spool.release_sync(qid)
    held = sum(r.state is State.HELD for r in left.recipients)
    print(f"{qid}: {deleted} recipient(s) deleted; {held} held in quarantine remain")
    return 0


# --- the parsers -----------------------------------------------------------------------------


def add_commands(
    commands: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """Add ``kith queue …`` to the ``kith`` parser."""

    def leaf(
        actions: argparse._SubParsersAction[Any], name: str, handler: Standalone, help: str
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(
            name, help=help, description=help, parents=[common]
        )
        p.set_defaults(standalone=handler, handler=None, parser=p, check=None)
        return p

    queue = commands.add_parser(
        "queue",
        help="the delivery queue",
        description="The delivery queue: messages still to deliver, in <data_dir>/spool.",
        parents=[common],
    )
    actions = queue.add_subparsers(dest="subcommand", metavar="ACTION", required=True)
    p = leaf(actions, "list", cmd_list, "List messages with recipients still to deliver.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = leaf(actions, "show", cmd_show, "Show a message: envelope, recipients, headers.")
    p.add_argument("queue_id", metavar="ID")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = leaf(actions, "flush", cmd_flush, "Attempt one message (or all) now, whatever the backoff.")
    p.add_argument("queue_id", metavar="ID", nargs="?")
    p = leaf(actions, "hold", cmd_hold, "Stop delivery attempts of a message until released.")
    p.add_argument("queue_id", metavar="ID")
    p = leaf(actions, "release", cmd_release, "Release a held message and attempt it now.")
    p.add_argument("queue_id", metavar="ID")
    p = leaf(
        actions,
        "delete",
        cmd_delete,
        "Delete a message: its undelivered recipients end DELETED, no DSN is sent.",
    )
    p.add_argument("queue_id", metavar="ID")
