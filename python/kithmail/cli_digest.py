"""``kith digest send [--user USER] [--now]``: the quarantine digest by hand.

Without ``--now`` it runs the pass the server runs once a day at
``[digest] at`` (`kithmail.digest.Digest.pass_sync`): a digest to every
user due for the current slot, listing what was held up to a few minutes
ago. With ``--now`` every user with anything held since their last digest
gets one at once, listing everything up to now. ``--user`` limits either to
one user. Opted-out and disabled users never get one, and with
``[digest] enabled = false`` the command refuses.

Opens the same spool and database as the server (`kithmail.cli_quarantine.
open_quarantine`); each digest is spooled for local delivery and a flush
request tells the running queue to deliver it now (without a running
server it is delivered at the next start). Trusts its operator; prints
only addresses and queue ids.
"""

from __future__ import annotations

import argparse
from typing import Any

from kithmail import config
from kithmail.cli import CommandError
from kithmail.cli_quarantine import open_quarantine
from kithmail.db import DatabaseError, InvalidError, fold_address
from kithmail.digest import Digest, wants


def cmd_send(args: argparse.Namespace, settings: config.Settings) -> int:
    if not settings.digest.enabled:
        raise CommandError("digests are off ([digest] enabled = false)")
    user: str | None = None
    with open_quarantine(settings) as q:
        if args.user is not None:
            try:
                found = q.db.user(fold_address(args.user))
            except (InvalidError, DatabaseError) as e:
                raise CommandError(str(e)) from None
            if found.disabled:
                raise CommandError(f"{found.address} is disabled: no digest")
            if not wants(q.db, found.id):
                raise CommandError(f"{found.address} has turned the digest off")
            user = found.address
        digest = Digest(q.db, q, settings)
        sent = digest.pass_sync(q.spool, q.spool.request_flush_sync, user=user, force=args.now)
    for address, queue_id in sent:
        print(f"digest {queue_id} to {address}")
    if not sent:
        print("no digest due" + ("" if args.now else " (--now sends what is held so far)"))
    return 0


def add_commands(
    commands: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """Add ``kith digest send`` to the ``kith`` parser."""
    group = commands.add_parser(
        "digest",
        help="the daily quarantine digest",
        description="The mail that lists each user's newly held messages, with release links.",
        parents=[common],
    )
    actions = group.add_subparsers(dest="subcommand", metavar="ACTION", required=True)
    help_ = "Send the digests due now (as the server does daily), or with --now at once."
    p: argparse.ArgumentParser = actions.add_parser(
        "send", help=help_, description=help_, parents=[common]
    )
    p.add_argument("--user", metavar="USER", default=None, help="only this user")
    p.add_argument(
        "--now",
        action="store_true",
        help="ignore the schedule: send to every user with mail held since their last digest",
    )
    p.set_defaults(standalone=cmd_send, handler=None, parser=p, check=None)
