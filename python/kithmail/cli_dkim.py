"""``kith dkim keygen DOMAIN [--selector S]``: a signing key for one of our domains.

Makes an RSA 2048 key in ``<data_dir>/dkim/<domain>.<selector>.pem``
(0600, never overwriting one) and prints the DNS record to publish, one
zone-file line whose value is split into strings of at most 255 octets.
Challenges, digests and DSNs from the domain are signed with the newest key
from then on (`kithmail.dkimkeys.signer_for`); publish the record first.

Trusts its operator; the domain and selector are checked before they name
a file. Standards: RFC 6376 §3.6.1 (the key record), RFC 1035 §3.3.14.
"""

from __future__ import annotations

import argparse
from typing import Any

from kithmail import config
from kithmail.cli import CommandError
from kithmail.dkimkeys import DkimKeyError, keygen


def cmd_keygen(args: argparse.Namespace, settings: config.Settings) -> int:
    selector = args.selector or settings.dkim.selector
    try:
        path, record = keygen(settings.server.data_dir, args.domain, selector)
    except DkimKeyError as e:
        raise CommandError(str(e)) from None
    local = {d.lower() for d in settings.domains.local}
    print(f"; key: {path}")
    if path.name.rsplit(".", 2)[0] not in local:
        print("; note: this domain is not in [domains] local")
    print("; publish this record, then mail from the domain is signed with the key:")
    print(record)
    return 0


def add_commands(
    commands: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """Add ``kith dkim keygen`` to the ``kith`` parser."""
    group = commands.add_parser(
        "dkim",
        help="DKIM keys of our own domains",
        description="DKIM keys that sign the mail kithmail itself sends (challenges, "
        "digests, DSNs), in <data_dir>/dkim.",
        parents=[common],
    )
    actions = group.add_subparsers(dest="subcommand", metavar="ACTION", required=True)
    help_ = "Make an RSA 2048 key for DOMAIN and print the DNS TXT record to publish."
    p: argparse.ArgumentParser = actions.add_parser(
        "keygen", help=help_, description=help_, parents=[common]
    )
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument(
        "--selector",
        metavar="S",
        default=None,
        help="the key's selector (default: [dkim] selector, 'kithmail')",
    )
    p.set_defaults(standalone=cmd_keygen, handler=None, parser=p, check=None)
