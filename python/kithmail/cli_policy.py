"""``kith policy show|set|unset``: the database's policy overrides from the shell.

``kith policy show [--tenant T] [--json]`` lists every key the scope may
override (global: every key; a tenant: the keys a tenant admin may change)
with its value in force, where that value comes from (built-in, file,
global or tenant) and what it replaces. ``kith policy set KEY VALUE
[--tenant T]`` stores an override, ``kith policy unset KEY [--tenant T]``
removes one; without ``--tenant`` they act on the global overrides. Bare
``kith policy`` still runs the Postfix policy service (`kithmail.cli`).

Everything goes through `kithmail.overrides.Overrides`, over the settings
of ``-c FILE`` and the same database as the server (``<data_dir>/
kithmail.db``), so an override is validated exactly as the web UI and the
config file validate it, and is in the audit log as ``policy.set`` or
``policy.unset`` by ``cli:<unix user>``. The running server picks a change
up within about a second (it looks at the overrides generation); no signal
is needed.

VALUE is read as a TOML value when it is one (``true``, ``3``, ``"60s"``,
``["a", "b"]``), else taken as a bare string (``reject``, ``60s``), so the
shell quoting stays light. Trusts its operator, not their typing: a refused
value is one line naming the key and why (exit 2); an unknown tenant, or
unsetting what is not set, is exit 1.
Standards: TOML 1.0 (VALUE), RFC 8259 (``--json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kithmail import config, db
from kithmail.cli import CommandError, table
from kithmail.cli_quarantine import actor
from kithmail.cli_users import open_db, tenant_arg
from kithmail.overrides import OverrideError, Overrides, Source, keys

Standalone = Callable[[argparse.Namespace, config.Settings], int]

# A value longer than this is not typed by a person; Overrides bounds it again.
MAX_VALUE_TEXT = 64 * 1024


def parse_value(text: str) -> Any:
    """VALUE as an override takes it: a TOML value if it is one, else the text itself.

    ``true`` is a bool, ``3`` an int, ``"tag"`` and ``tag`` the same string,
    ``["a", "b"]`` a list. A date or time, a table, or anything spanning
    lines stays the text as given (Overrides then judges it).
    """
    if len(text) > MAX_VALUE_TEXT or "\n" in text or "\r" in text:
        return text
    try:
        doc = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    value = doc.get("v")
    if len(doc) != 1 or not isinstance(value, str | bool | int | float | list):
        return text
    return value


def _scope(name: str | None) -> str:
    return "global" if not name else f"tenant {name}"


def _printable(text: str) -> str:
    # Values were typed by admins, some through the web: never let one drive the terminal.
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def shown(value: Any) -> str:
    """A value for the table, as an admin would write it (lists comma-separated)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return ", ".join(_printable(str(v)) for v in value) if value else "(empty)"
    return _printable(str(value))


def _overrides(database: db.Database, settings: config.Settings) -> Overrides:
    return Overrides(database, lambda: settings)


def _tenant(database: db.Database, name: str | None) -> str:
    """'' for global, else the existing tenant's name; NotFoundError names a missing one."""
    return "" if name is None else database.tenant(name).name


def _source(ov: Overrides, scope: str, key: str) -> Source | None:
    return next((s for s in ov.explain(scope or None) if s.key == key), None)


def _replaces(s: Source) -> str:
    return "-" if s.replaces_origin is None else f"{shown(s.replaces)} ({s.replaces_origin})"


def _why(ov: Overrides, scope: str, key: str, value: Any) -> str:
    try:
        ov.validate(scope, key, value)
    except OverrideError as e:
        return _printable(str(e))
    return "it does not validate together with the other overrides"


@contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Hold back a logger's warnings (the command reports them itself)."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _refused(e: OverrideError) -> int:
    print(f"kith: error: {_printable(str(e))}", file=sys.stderr)
    return 2


# --- commands --------------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace, settings: config.Settings) -> int:
    here = "global" if args.tenant is None else "tenant"
    with open_db(settings) as database, _quiet(logging.getLogger("kithmail.overrides")):
        scope = _tenant(database, args.tenant)
        ov = _overrides(database, settings)
        sources = ov.explain(scope or None)
        stored = ov.get(scope)
        # A stored override that no longer validates (the file changed under it) is
        # ignored by the server; say so, and why, here rather than through its log.
        ignored = {s.key: stored[s.key] for s in sources if s.key in stored and s.origin != here}
        why = {key: _why(ov, scope, key, value) for key, value in ignored.items()}
    if args.json:
        doc = [
            {
                "key": s.key,
                "value": s.value,
                "origin": s.origin,
                "replaces": s.replaces if s.replaces_origin is not None else None,
                "replaces_origin": s.replaces_origin,
                "ignored_override": ignored.get(s.key),
            }
            for s in sources
        ]
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    rows = [(s.key, shown(s.value), s.origin, _replaces(s)) for s in sources]
    print(table(["key", "value", "origin", "replaces"], rows))
    for key, value in ignored.items():
        print(
            f"note: the {_scope(scope)} override {key} = {shown(value)} is ignored: {why[key]}",
            file=sys.stderr,
        )
    return 0


def cmd_set(args: argparse.Namespace, settings: config.Settings) -> int:
    value = parse_value(args.value)
    with open_db(settings) as database:
        scope = _tenant(database, args.tenant)
        ov = _overrides(database, settings)
        before = _source(ov, scope, args.key)
        try:
            ov.set(scope, args.key, value, actor=actor())
        except OverrideError as e:
            return _refused(e)
        after = _source(ov, scope, args.key)
    assert after is not None  # set() accepted the key for this scope
    was = ""
    if before is not None and (before.value, before.origin) == (after.value, after.origin):
        was = " (unchanged)"
    elif before is not None:
        was = f" (was {shown(before.value)}, from {before.origin})"
    print(f"{args.key} = {shown(after.value)} for {_scope(scope)}{was}")
    return 0


def cmd_unset(args: argparse.Namespace, settings: config.Settings) -> int:
    with open_db(settings) as database:
        scope = _tenant(database, args.tenant)
        ov = _overrides(database, settings)
        if args.key not in ov.get(scope):
            if args.key not in {k.key for k in keys("global_admin")}:
                return _refused(OverrideError(f"unknown key `{args.key[:200]}`"))
            raise CommandError(f"no {_scope(scope)} override of {args.key}; nothing changed")
        try:
            ov.unset(scope, args.key, actor=actor())
        except OverrideError as e:
            return _refused(e)
        after = _source(ov, scope, args.key)
    now = "" if after is None else f"; in force now: {shown(after.value)} ({after.origin})"
    print(f"removed the {_scope(scope)} override of {args.key}{now}")
    return 0


# --- the parsers -----------------------------------------------------------------------------


def add_commands(
    commands: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """Add ``show``, ``set`` and ``unset`` under ``kith policy`` (bare, it runs the service)."""
    policy: argparse.ArgumentParser | None = commands.choices.get("policy")
    if policy is None:  # kithmail.cli adds `kith policy` (the service) first
        policy = commands.add_parser("policy", help="policy overrides", parents=[common])
        policy.set_defaults(handler=None, parser=policy, check=None)
    actions = policy.add_subparsers(
        dest="subcommand",
        metavar="[ACTION]",
        required=False,
        title="policy overrides (without ACTION: run the policy service)",
    )

    def leaf(name: str, handler: Standalone, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(
            name, help=help, description=help, parents=[common]
        )
        p.set_defaults(standalone=handler, handler=None, parser=p, check=None)
        return p

    tenant_help = "a tenant's overrides (default: the global ones)"
    p = leaf(
        "show",
        cmd_show,
        "Show every key the scope may override: its value in force, where that comes from "
        "(built-in, file, global, tenant) and what it replaces.",
    )
    p.add_argument("--tenant", metavar="TENANT", type=tenant_arg, help=tenant_help)
    p.add_argument("--json", action="store_true", help="print JSON")
    p = leaf(
        "set",
        cmd_set,
        "Override a key, globally or for one tenant; the running server applies it within "
        "about a second.",
    )
    p.add_argument("key", metavar="KEY", help="a dotted key, e.g. spf.softfail")
    p.add_argument(
        "value",
        metavar="VALUE",
        help='a TOML value (true, 3, "60s", \'["a", "b"]\') or a bare word (reject)',
    )
    p.add_argument("--tenant", metavar="TENANT", type=tenant_arg, help=tenant_help)
    p = leaf("unset", cmd_unset, "Remove an override: the next-weaker value applies again.")
    p.add_argument("key", metavar="KEY", help="a dotted key, e.g. spf.softfail")
    p.add_argument("--tenant", metavar="TENANT", type=tenant_arg, help=tenant_help)
