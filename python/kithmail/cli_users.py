"""``kith user …`` and ``kith tenant …``: users and tenants from the shell.

``kith user add|list|remove|passwd|disable|enable|role`` and ``kith tenant
add|list|domain`` open the control-plane database
(``<data_dir>/kithmail.db``), first making the config's local domains
known to it (``[domains] local``; a new one joins the tenant ``default``),
do one job and close. SQLite serialises writers between processes, so these
commands are safe while the server runs; a change reaches it within about a
second. ``kith user remove`` also opens the core, to remove the user's
community entries with the account (docs/retention.md).

Trusts its operator, not their typing: every address must be a plain
``local@domain`` of a local domain (no quoted local parts, ``%``, ``!``,
source routes or address literals), a bad one is a usage error (exit 2).
A password is never taken from the command line, where ``ps`` and the shell
history would see it: ``--password-stdin`` reads it, otherwise one is
generated and printed once. Errors are one line on stderr; exit 1 for "not
found" or a failure at run time.
Standards: RFC 5321 (address syntax), RFC 8259 (``--json``), ISO 8601
(times, UTC).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kithmail import Core, CoreError, config, db
from kithmail.cli import CommandError, iso, table
from kithmail.cli_quarantine import actor

Standalone = Callable[[argparse.Namespace, config.Settings], int]


# --- argument types --------------------------------------------------------------------------


def address_arg(text: str) -> str:
    """argparse type: a plain local@domain, folded."""
    try:
        return db.fold_address(text)
    except db.InvalidError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def domain_arg(text: str) -> str:
    """argparse type: a domain name, folded."""
    try:
        return db.fold_domain(text)
    except db.InvalidError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def tenant_arg(text: str) -> str:
    """argparse type: a tenant name, folded."""
    try:
        return db.fold_tenant(text)
    except db.InvalidError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# --- helpers ---------------------------------------------------------------------------------


@contextmanager
def open_db(settings: config.Settings) -> Iterator[db.Database]:
    """The database of ``settings``, its local domains synced; errors as CommandError."""
    try:
        database = db.Database.open(settings.server.data_dir / "kithmail.db")
    except db.DatabaseError as e:
        raise CommandError(str(e)) from None
    try:
        database.sync_domains(settings.domains.local)
        yield database
    except db.DatabaseError as e:
        raise CommandError(str(e)) from None
    finally:
        database.close()


def read_password(args: argparse.Namespace) -> str | None:
    """The password from stdin (its first line) with --password-stdin; None without."""
    if not args.password_stdin:
        return None
    line = sys.stdin.readline()
    password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        raise CommandError("--password-stdin: no password on stdin")
    return password


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _user_doc(u: db.User) -> dict[str, Any]:
    return {
        "address": u.address,
        "tenant": u.tenant,
        "role": u.role,
        "disabled": u.disabled,
        "created": iso(u.created),
        "password_changed": iso(u.password_changed),
    }


# --- user ------------------------------------------------------------------------------------


def cmd_user_add(args: argparse.Namespace, settings: config.Settings) -> int:
    password = read_password(args)
    with open_db(settings) as database:
        user, password = database.add_user(args.address, password=password, role=args.role)
    print(f"added user {user.address} (tenant {user.tenant}, role {user.role})")
    if not args.password_stdin:
        print(f"password: {password}")
        _note("the password is shown only this once; kithmail keeps only its hash")
    return 0


def cmd_user_list(args: argparse.Namespace, settings: config.Settings) -> int:
    with open_db(settings) as database:
        users = database.users(args.tenant)
    if args.json:
        print(json.dumps([_user_doc(u) for u in users], indent=2, ensure_ascii=False))
        return 0
    if not users:
        _note("no users" + (f" in tenant {args.tenant}" if args.tenant else ""))
        return 0
    rows = [
        (u.address, u.tenant, u.role, "disabled" if u.disabled else "enabled", iso(u.created))
        for u in users
    ]
    print(table(["address", "tenant", "role", "status", "created"], rows))
    return 0


def clear_community(settings: config.Settings, address: str) -> int:
    """Remove every community entry of `address` from the core; their number.

    With no core yet there are no entries, and none is created here (a new
    core takes its prefix lengths from the server's config, not from us).
    """
    path = settings.core_dir
    if not (path / "data.mdb").exists():
        return 0
    try:
        # Prefix lengths as stored: removing a user never fails over them.
        core = Core(
            str(path), map_size=settings.server.core_map_size, ipv4_prefix=None, ipv6_prefix=None
        )
    except CoreError as e:
        raise CommandError(f"opening the core {path}: {e}") from None
    try:
        return core.community.clear(address)
    except CoreError as e:
        raise CommandError(f"removing the community of {address}: {e}") from None
    finally:
        core.close()


def cmd_user_remove(args: argparse.Namespace, settings: config.Settings) -> int:
    # The community goes first: should the core fail, the account is still
    # there and the same command can be run again.
    with open_db(settings) as database:
        user = database.user(args.address)
        cleared = clear_community(settings, user.address)
        database.remove_user(user.address)
        database.audit(
            actor(),
            "user.remove",
            tenant=user.tenant,
            target=user.address,
            detail=f"{cleared} community entries removed",
        )
    print(f"removed user {user.address}")
    _note(f"and {cleared} community entries (held copies expire by quarantine_days)")
    return 0


def cmd_user_passwd(args: argparse.Namespace, settings: config.Settings) -> int:
    password = read_password(args)
    generated = password is None
    if password is None:
        password = db.generate_password()
    with open_db(settings) as database:
        user = database.set_password(args.address, password)
    print(f"changed the password of {user.address}")
    if generated:
        print(f"password: {password}")
        _note("the password is shown only this once; kithmail keeps only its hash")
    return 0


def _set_disabled(args: argparse.Namespace, settings: config.Settings, disabled: bool) -> int:
    with open_db(settings) as database:
        before = database.user(args.address)
        user = database.set_disabled(args.address, disabled)
    word = "disabled" if disabled else "enabled"
    if before.disabled == user.disabled:
        print(f"{user.address} was already {word}")
    else:
        print(f"{word} {user.address}")
    return 0


def cmd_user_disable(args: argparse.Namespace, settings: config.Settings) -> int:
    return _set_disabled(args, settings, True)


def cmd_user_enable(args: argparse.Namespace, settings: config.Settings) -> int:
    return _set_disabled(args, settings, False)


def cmd_user_role(args: argparse.Namespace, settings: config.Settings) -> int:
    # The last enabled global admin keeps the role (db.set_role refuses, exit 1).
    with open_db(settings) as database:
        before = database.user(args.address)
        user = database.set_role(args.address, args.role)
        if before.role != user.role:
            database.audit(
                actor(),
                "user.role",
                tenant=user.tenant,
                target=user.address,
                detail=f"{before.role} -> {user.role}",
            )
    if before.role == user.role:
        print(f"{user.address} was already {user.role}")
    else:
        print(f"{user.address} is now {user.role} (was {before.role})")
    return 0


# --- tenant ----------------------------------------------------------------------------------


def cmd_tenant_add(args: argparse.Namespace, settings: config.Settings) -> int:
    with open_db(settings) as database:
        tenant = database.add_tenant(args.name)
    print(f"added tenant {tenant.name}")
    return 0


def cmd_tenant_list(args: argparse.Namespace, settings: config.Settings) -> int:
    with open_db(settings) as database:
        tenants = database.tenants()
    local = set(settings.domains.local)
    if args.json:
        doc = [
            {
                "name": t.name,
                "domains": list(t.domains),
                # Mapped to the tenant but no longer in [domains] local.
                "inactive_domains": [d for d in t.domains if d not in local],
                "users": t.users,
                "created": iso(t.created),
            }
            for t in tenants
        ]
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    if not tenants:
        _note("no tenants")
        return 0
    rows = [
        (
            t.name,
            ", ".join(d if d in local else f"{d} (not local)" for d in t.domains) or "-",
            t.users,
            iso(t.created),
        )
        for t in tenants
    ]
    print(table(["tenant", "domains", "users", "created"], rows))
    return 0


def cmd_tenant_domain(args: argparse.Namespace, settings: config.Settings) -> int:
    domain: str = args.domain
    if domain not in settings.domains.local:
        where = "a config file (-c FILE)" if settings.source.startswith("<") else settings.source
        raise CommandError(
            f"{domain} is not a local domain: add it to [domains] local in {where} first"
        )
    with open_db(settings) as database:
        before = {d: t.name for t in database.tenants() for d in t.domains}
        database.set_domain_tenant(domain, args.tenant)
        moved = database.tenant(args.tenant)
    if before.get(domain) == moved.name:
        print(f"{domain} already belongs to tenant {moved.name}")
    else:
        print(f"{domain} now belongs to tenant {moved.name}, with its users")
    return 0


# --- the parsers -----------------------------------------------------------------------------


def add_commands(
    commands: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """Add ``kith user …`` and ``kith tenant …`` to the ``kith`` parser."""

    def leaf(
        actions: argparse._SubParsersAction[Any], name: str, handler: Standalone, help: str
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(
            name, help=help, description=help, parents=[common]
        )
        p.set_defaults(standalone=handler, handler=None, parser=p, check=None)
        return p

    password_help = "read the password from the first line of stdin (default: generate one)"

    user = commands.add_parser(
        "user", help="local users", description="Local users.", parents=[common]
    )
    user_cmds = user.add_subparsers(dest="subcommand", metavar="ACTION", required=True)
    p = leaf(
        user_cmds,
        "add",
        cmd_user_add,
        "Add a user of a local domain (to its domain's tenant); print the generated password once.",
    )
    p.add_argument("address", metavar="ADDRESS", type=address_arg)
    p.add_argument("--role", choices=db.ROLES, default="user", help="default: user")
    p.add_argument("--password-stdin", action="store_true", help=password_help)
    p = leaf(user_cmds, "list", cmd_user_list, "List users, of every tenant or of one.")
    p.add_argument("--tenant", metavar="TENANT", type=tenant_arg, help="only this tenant's")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = leaf(user_cmds, "remove", cmd_user_remove, "Remove a user.")
    p.add_argument("address", metavar="ADDRESS", type=address_arg)
    p = leaf(
        user_cmds,
        "passwd",
        cmd_user_passwd,
        "Set a user's password; print the generated one once.",
    )
    p.add_argument("address", metavar="ADDRESS", type=address_arg)
    p.add_argument("--password-stdin", action="store_true", help=password_help)
    p = leaf(user_cmds, "disable", cmd_user_disable, "Disable a user: no login from now on.")
    p.add_argument("address", metavar="ADDRESS", type=address_arg)
    p = leaf(user_cmds, "enable", cmd_user_enable, "Enable a disabled user again.")
    p.add_argument("address", metavar="ADDRESS", type=address_arg)
    p = leaf(
        user_cmds,
        "role",
        cmd_user_role,
        "Make a user a plain user, an admin of their tenant, or a global admin.",
    )
    p.add_argument("address", metavar="ADDRESS", type=address_arg)
    p.add_argument("role", metavar="ROLE", choices=db.ROLES, help=" | ".join(db.ROLES))

    tenant = commands.add_parser(
        "tenant",
        help="tenants (organisations) and their domains",
        description="Tenants (organisations) and their domains.",
        parents=[common],
    )
    tenant_cmds = tenant.add_subparsers(dest="subcommand", metavar="ACTION", required=True)
    p = leaf(tenant_cmds, "add", cmd_tenant_add, "Add a tenant (with no domains yet).")
    p.add_argument("name", metavar="NAME", type=tenant_arg)
    p = leaf(
        tenant_cmds, "list", cmd_tenant_list, "List tenants with their domains and user counts."
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p = leaf(
        tenant_cmds,
        "domain",
        cmd_tenant_domain,
        "Give a local domain ([domains] local) and its users to a tenant.",
    )
    p.add_argument("tenant", metavar="TENANT", type=tenant_arg)
    p.add_argument("domain", metavar="DOMAIN", type=domain_arg)
