"""The ``kith`` command: administration of the core tables from the shell.

``kith check-config [-c FILE]`` validates a config file (the embedded
default without one) and prints every mistake, each naming its key.
``kith policy [-c FILE]`` runs the Postfix policy service until SIGTERM
(``kith policy show|set|unset`` are the policy overrides: `kithmail.cli_policy`).
``kith recon show|exempt``, ``kith reputation load|lists|drop|lookup`` and
``kith community add|remove|list|import`` open the core's LMDB environment
(``<data_dir>/core``), do one job, flush and close. LMDB lets several
processes open one environment and serialises their writers, so these
commands are safe while the server has the same environment open.

Trusts its operator, not the operator's files: every address, network and
community entry is checked before anything is written, a bad one is named
(with its file and line), and a load or import with a bad line writes
nothing. Errors are one line on stderr; exit status 0 for done, 1 for "not
found" or a failure at run time, 2 for a usage error.
Standards: RFC 4291 and RFC 4632 (address and CIDR notation), RFC 4180
(CSV import), ISO 8601 (every time printed, always UTC).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, NoReturn

from kithmail import Core, CoreError, __version__, config
from kithmail._core import normalize_entry

DATA_DIR_ENV = "KITHMAIL_DATA_DIR"
DEFAULT_DATA_DIR = "./var"
# As kithmail._core's stubs spell them (the aliases exist only there).
Kind = Literal["allow", "block"]
SOURCES = ("manual", "admin", "import", "outbound", "sav", "journal")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class CoreSettings:
    """What the CLI needs to open the core and to judge a Recon row.

    The values other than ``data_dir`` are the core's defaults today; the
    config file (``-c FILE``, a later issue) fills them from ``[server]``
    and ``[recon]``, so that ``recon show`` judges a row by the server's
    own timings. Prefix lengths of None adopt those stored in the core.
    """

    data_dir: Path
    ipv4_prefix: int | None = None
    ipv6_prefix: int | None = None
    min_delay: int = 60
    retry_window: int = 86400
    pass_ttl: int = 30 * 86400

    @property
    def core_path(self) -> Path:
        return self.data_dir / "core"


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> CoreSettings:
    """The settings for this run: the command line, then the environment, then defaults.

    With ``-c FILE`` the file's ``[server] data_dir`` applies when neither
    ``--data-dir`` nor ``$KITHMAIL_DATA_DIR`` is given, and its ``[recon]``
    prefix lengths and timings are the server's (a mismatch with the stored
    prefix lengths is then an error, as it is for the server).
    """
    path = getattr(args, "config", None)
    if path is None:
        data_dir = getattr(args, "data_dir", None) or environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
        return CoreSettings(data_dir=Path(data_dir))
    cfg = config.load(path)
    data_dir = getattr(args, "data_dir", None) or environ.get(DATA_DIR_ENV) or cfg.server.data_dir
    r = cfg.recon
    return CoreSettings(
        data_dir=Path(data_dir),
        ipv4_prefix=r.ipv4_prefix,
        ipv6_prefix=r.ipv6_prefix,
        min_delay=int(r.min_delay),
        retry_window=int(r.retry_window),
        pass_ttl=int(r.pass_ttl),
    )


def open_core(settings: CoreSettings) -> Core:
    settings.core_path.mkdir(parents=True, exist_ok=True)
    return Core(
        str(settings.core_path),
        ipv4_prefix=settings.ipv4_prefix,
        ipv6_prefix=settings.ipv6_prefix,
        min_delay=settings.min_delay,
        retry_window=settings.retry_window,
        pass_ttl=settings.pass_ttl,
    )


# --- small helpers ---------------------------------------------------------------------------


def iso(ts: int) -> str:
    """A Unix time as ISO 8601 UTC; 0 (never set) as "-"."""
    if ts <= 0:
        return "-"
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> int:
    return int(time.time())


def _parse_ip(text: str) -> IpAddress:
    addr = ipaddress.ip_address(text)
    # "::ffff:192.0.2.1" is the IPv4 address, as it is for the core.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def ip_arg(text: str) -> str:
    """argparse type: an IPv4 or IPv6 address, passed on as written."""
    try:
        if "%" in text:  # a scoped address names an interface, not a mail source
            raise ValueError
        _parse_ip(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None
    return text


def cidr_arg(text: str) -> str:
    """argparse type: a network in CIDR notation (a bare address is its /32 or /128)."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        try:
            masked = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a CIDR network: {text!r}") from None
        raise argparse.ArgumentTypeError(f"{e} (did you mean {masked}?)") from None
    mapped = net.network_address.ipv4_mapped if isinstance(net, ipaddress.IPv6Network) else None
    if mapped is not None and net.prefixlen >= 96:
        # "::ffff:10.0.0.0/104" is 10.0.0.0/8, as the core stores and prints it.
        return f"{mapped}/{net.prefixlen - 96}"
    return str(net)


def masked_network(ip: str, core: Core) -> IpNetwork:
    """The network Recon keys ``ip`` under, by the core's own prefix lengths."""
    addr = _parse_ip(ip)
    stats = core.stats()
    prefix = stats["ipv4_prefix"] if addr.version == 4 else stats["ipv6_prefix"]
    return ipaddress.ip_network((addr, prefix), strict=False)


def exempting_networks(ip: str, exempt: Sequence[str]) -> list[str]:
    """Those of the exempt networks that contain ``ip``."""
    addr = _parse_ip(ip)
    found = []
    for text in exempt:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            continue
        if net.version == addr.version and addr in net:
            found.append(text)
    return found


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    """Name/value lines with the values aligned."""
    width = max(len(name) for name, _ in pairs)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in pairs)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(headers), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _note(message: str) -> None:
    """Information for a person, kept off stdout so scripts read only data."""
    print(message, file=sys.stderr)


class CommandError(Exception):
    """A run-time failure the CLI words itself; exit status 1."""


# --- recon -----------------------------------------------------------------------------------


def cmd_recon_show(core: Core, settings: CoreSettings, args: argparse.Namespace) -> int:
    ip: str = args.ip
    recon = core.recon
    exempt_by = exempting_networks(ip, recon.exempt_list())
    entry = recon.show(ip)
    if entry is None and not exempt_by:
        print(f"{ip}: no entry (network {masked_network(ip, core)})")
        return 1
    if entry is None:
        lines = [("network", str(masked_network(ip, core))), ("entry", "none")]
    else:
        lines = [
            ("network", entry.network),
            ("first seen", iso(entry.first_seen)),
            ("last seen", iso(entry.last_seen)),
            ("pass until", iso(entry.pass_until)),
            ("attempts", str(entry.attempts)),
            ("passes", str(entry.passes)),
        ]
    lines.append(("exempt", ", ".join(exempt_by) if exempt_by else "no"))
    lines.append(("status now", recon.peek(ip, _now()).status))
    print(fields(lines))
    return 0


def check_recon_exempt(args: argparse.Namespace) -> str | None:
    if args.list:
        return "--list takes no CIDR" if args.cidr else None
    if not args.cidr:
        return "give a CIDR to add, --remove CIDR, or --list"
    return None


def cmd_recon_exempt(core: Core, settings: CoreSettings, args: argparse.Namespace) -> int:
    recon = core.recon
    if args.list:
        networks = recon.exempt_list()
        for net in networks:
            print(net)
        if not networks:
            _note("no exempt networks")
        return 0
    cidr: str = args.cidr
    if args.remove:
        if not recon.exempt_remove(cidr):
            raise CommandError(f"{cidr} is not an exempt network")
        print(f"removed exempt network {cidr}")
    elif recon.exempt_add(cidr):
        print(f"added exempt network {cidr}")
    else:
        print(f"{cidr} is already exempt")
    return 0


# --- reputation ------------------------------------------------------------------------------


def cmd_reputation_load(core: Core, settings: CoreSettings, args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.exists():
        raise CommandError(f"no such file: {path}")
    if path.is_dir():
        raise CommandError(f"{path} is a directory, not a list file")
    action = args.action or ("accept" if args.kind == "allow" else "reject")
    started = time.perf_counter()
    n = core.reputation.load_file(
        args.name, args.kind, str(path), action=action, score=args.score, now=_now()
    )
    took = time.perf_counter() - started
    print(
        f"loaded {n} prefixes into {args.kind} list {args.name!r} "
        f"(action {action}, score {args.score}) in {took:.3f} s"
    )
    return 0


def cmd_reputation_lists(core: Core, settings: CoreSettings, args: argparse.Namespace) -> int:
    lists = core.reputation.lists()
    if not lists:
        _note("no reputation lists loaded")
        return 0
    rows = [
        (r.name, r.kind, r.action, r.score, r.prefixes, r.intervals, iso(r.loaded_at))
        for r in sorted(lists, key=lambda r: r.name)
    ]
    headers = ["name", "kind", "action", "score", "prefixes", "intervals", "loaded"]
    print(table(headers, rows))
    return 0


def cmd_reputation_drop(core: Core, settings: CoreSettings, args: argparse.Namespace) -> int:
    if not core.reputation.drop(args.name):
        raise CommandError(f"no reputation list named {args.name!r}")
    print(f"dropped reputation list {args.name!r}")
    return 0


def cmd_reputation_lookup(core: Core, settings: CoreSettings, args: argparse.Namespace) -> int:
    m = core.reputation.lookup(args.ip)
    if m is None:
        print(f"{args.ip}: not listed")
        return 1
    print(
        f"{args.ip}: {m.kind} list {m.list!r} prefix {m.prefix} action {m.action} score {m.score}"
    )
    return 0


# --- community -------------------------------------------------------------------------------


def _kind(args: argparse.Namespace) -> Kind:
    return "block" if args.block else "allow"


def cmd_community_add(core: Core, settings: CoreSettings, args: argparse.Namespace) -> int:
    kind = _kind(args)
    # True when the entry is new, or moved between allow and block.
    changed = core.community.add(args.user, args.entry, kind, args.source, _now())
    entry = normalize_entry(args.entry)
    if changed:
        print(f"{entry} is now on the {kind} list of {args.user}")
    else:
        print(f"{entry} was already on the {kind} list of {args.user}; unchanged")
    return 0


def cmd_community_remove(core: Core, settings: CoreSettings, args: argparse.Namespace) -> int:
    if not core.community.remove(args.user, args.entry):
        raise CommandError(f"no entry {args.entry} in the community of {args.user}")
    print(f"removed {normalize_entry(args.entry)} for {args.user}")
    return 0


def cmd_community_list(core: Core, settings: CoreSettings, args: argparse.Namespace) -> int:
    entries = core.community.list(args.user)
    if args.json:
        doc = [
            {"entry": e.entry, "kind": e.kind, "source": e.source, "added": iso(e.added)}
            for e in entries
        ]
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    if not entries:
        _note(f"no community entries for {args.user}")
        return 0
    rows = [(e.entry, e.kind, e.source, iso(e.added)) for e in entries]
    print(table(["entry", "kind", "source", "added"], rows))
    return 0


def read_entries(text: str, label: str) -> list[str]:
    """The community entries of an import file, folded, first occurrence kept.

    One entry per line, or a CSV whose first column is the entry; ``#``
    comments and blank lines are skipped, and so is a header row (a first
    row whose first cell cannot be an entry, e.g. ``email,name``). Every bad
    line is an error naming ``label`` and the line, and nothing is imported.
    """
    entries: dict[str, None] = {}
    bad: list[str] = []
    first = True
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            cell = row[0].strip() if row else ""
            if not cell or cell.startswith("#"):
                continue
            if first and "@" not in cell and not cell.lower().startswith("list:"):
                first = False
                continue
            first = False
            try:
                entries.setdefault(normalize_entry(cell), None)
            except (CoreError, ValueError) as e:
                bad.append(f"{label}:{reader.line_num}: {e}")  # the core's text names it
    except csv.Error as e:
        raise CommandError(f"{label}:{reader.line_num}: unreadable CSV: {e}") from None
    if bad:
        more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        raise CommandError(f"{bad[0]}{more}; nothing imported")
    return list(entries)


def cmd_community_import(core: Core, settings: CoreSettings, args: argparse.Namespace) -> int:
    if args.file == "-":
        label, data = "<stdin>", sys.stdin.buffer.read()
    else:
        label = args.file
        data = Path(args.file).read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's CSV export starts with a BOM
    except UnicodeDecodeError as e:
        raise CommandError(f"{label}: not UTF-8 text (bad byte at offset {e.start})") from None
    entries = read_entries(text, label)
    if not entries:
        raise CommandError(f"{label}: no entries found; nothing imported")
    kind = _kind(args)
    changed = core.community.add_many(args.user, entries, kind, "import", _now())
    print(
        f"imported {len(entries)} {kind} entries for {args.user}: {changed} added or changed, "
        f"{len(entries) - changed} already there"
    )
    return 0


# --- the parser ------------------------------------------------------------------------------

Handler = Callable[[Core, CoreSettings, argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _common() -> _Parser:
    """Options every command takes, before or after its name (``-c FILE`` joins here)."""
    p = _Parser(add_help=False)
    p.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="the kithmail.toml the server runs with (default: the embedded default)",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help=f"where kithmail keeps its data, the core tables in DIR/core "
        f"(default: ${DATA_DIR_ENV}, else {DEFAULT_DATA_DIR})",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(
        prog="kith",
        description="kithmail, an inbound email security gateway: administration commands.",
        epilog="Exit status: 0 done, 1 not found or failed, 2 bad usage.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"kith {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def group(name: str, help: str) -> _Parser:
        return commands.add_parser(name, help=help, description=help, parents=[common])

    def leaf(
        actions: argparse._SubParsersAction[_Parser],
        name: str,
        handler: Handler,
        help: str,
    ) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(handler=handler, parser=p, check=None)
        return p

    # Commands that run without opening the core (main() dispatches them).
    for name, help, description in (
        (
            "check-config",
            "validate a config file",
            "Validate a config file (-c FILE; without one, the embedded default) "
            "and print every mistake, naming its key; exit 1 when there is one.",
        ),
        (
            "policy",
            "run the Postfix policy service; show|set|unset: policy overrides",
            "Serve Recon and Reputation to Postfix over its policy-delegation "
            "protocol on [server] listeners.policy until SIGTERM or SIGINT.",
        ),
    ):
        sub = commands.add_parser(name, help=help, description=description, parents=[common])
        sub.set_defaults(handler=None, parser=sub, check=None)

    # recon
    recon = group("recon", "the Recon table (greylisting by source)")
    recon_cmds = recon.add_subparsers(dest="subcommand", metavar="ACTION", required=True)
    p = leaf(
        recon_cmds,
        "show",
        cmd_recon_show,
        "Show the Recon row of an address's masked network and the status it would get "
        "now; exit 1 when there is no row (unless an exempt network covers it).",
    )
    p.add_argument("ip", metavar="IP", type=ip_arg)
    p = leaf(
        recon_cmds,
        "exempt",
        cmd_recon_exempt,
        "Add an exempt network (never deferred), remove one, or list them.",
    )
    p.add_argument("cidr", metavar="CIDR", nargs="?", type=cidr_arg)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--remove", action="store_true", help="remove CIDR instead of adding it")
    mode.add_argument("--list", action="store_true", help="list the exempt networks")
    p.set_defaults(check=check_recon_exempt)

    # reputation
    rep = group("reputation", "the Reputation lists (allow and block)")
    rep_cmds = rep.add_subparsers(dest="subcommand", metavar="ACTION", required=True)
    p = leaf(
        rep_cmds,
        "load",
        cmd_reputation_load,
        "Load a list file (one CIDR or IP per line, '#' comments), replacing the named "
        "list at once; a bad line fails the whole load.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--name", required=True, help="the list's name")
    p.add_argument("--kind", choices=["allow", "block"], default="block", help="default: block")
    p.add_argument(
        "--action",
        choices=["reject", "defer", "tag", "quarantine", "accept"],
        help="what a match does (default: reject for block lists, accept for allow lists)",
    )
    p.add_argument("--score", type=int, default=0, help="the list's score (default: 0)")
    leaf(rep_cmds, "lists", cmd_reputation_lists, "List the loaded reputation lists.")
    p = leaf(rep_cmds, "drop", cmd_reputation_drop, "Remove a reputation list.")
    p.add_argument("name", metavar="NAME")
    p = leaf(
        rep_cmds,
        "lookup",
        cmd_reputation_lookup,
        "Show the list entry that decides an address; exit 1 when none does.",
    )
    p.add_argument("ip", metavar="IP", type=ip_arg)

    # community
    com = group("community", "a user's community (allowed and blocked)")
    com_cmds = com.add_subparsers(dest="subcommand", metavar="ACTION", required=True)
    entry_help = "an address, a whole domain (@example.com) or a mailing list (list:<List-Id>)"
    p = leaf(com_cmds, "add", cmd_community_add, "Add an entry to a user's community.")
    p.add_argument("user", metavar="USER")
    p.add_argument("entry", metavar="ENTRY", help=entry_help)
    p.add_argument("--block", action="store_true", help="add to the block list, not allow")
    p.add_argument("--source", choices=SOURCES, default="manual", help="default: manual")
    p = leaf(com_cmds, "remove", cmd_community_remove, "Remove an entry from a user's community.")
    p.add_argument("user", metavar="USER")
    p.add_argument("entry", metavar="ENTRY", help=entry_help)
    p = leaf(com_cmds, "list", cmd_community_list, "List a user's community.")
    p.add_argument("user", metavar="USER")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = leaf(
        com_cmds,
        "import",
        cmd_community_import,
        "Import entries: one per line, or a CSV whose first column is the entry ('-' reads "
        "stdin); a bad line imports nothing.",
    )
    p.add_argument("user", metavar="USER")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--block", action="store_true", help="import to the block list, not allow")

    # Command groups that live in their own modules: each adds its parsers
    # with `standalone` set to a function (args, settings) -> exit status,
    # run by main() without opening the core.
    from kithmail import cli_gateway

    cli_gateway.add_commands(commands, common)
    return parser


# --- running ---------------------------------------------------------------------------------


def run(args: argparse.Namespace, settings: CoreSettings) -> int:
    """Open the core, run one command, flush and close."""
    handler: Handler = args.handler
    core = open_core(settings)
    try:
        status = handler(core, settings, args)
        core.flush()
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            core.close()
        raise
    core.close()
    return status


def check_config(path: str | None) -> int:
    """``kith check-config``: every mistake on stderr, one per line; 0 when none."""
    try:
        cfg = config.load(path)
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{cfg.source}: OK")
    return 0


def run_policy(path: str | None, data_dir: str | None) -> int:
    """``kith policy``: serve until SIGTERM/SIGINT, then flush the core and stop."""
    from kithmail.smtp.serve import serve_policy

    try:
        settings = config.load(path)
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    if data_dir:
        server = settings.server.model_copy(update={"data_dir": Path(data_dir)})
        settings = settings.model_copy(update={"server": server})
    try:
        return serve_policy(settings)
    except CoreError as e:
        print(f"kith: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"kith: error: cannot listen: {e.strerror or e}", file=sys.stderr)
        return 1


def load_settings(args: argparse.Namespace) -> config.Settings:
    """The server's settings as `-c FILE` and `--data-dir` give them."""
    settings = config.load(getattr(args, "config", None))
    if data_dir := getattr(args, "data_dir", None) or os.environ.get(DATA_DIR_ENV):
        server = settings.server.model_copy(update={"data_dir": Path(data_dir)})
        settings = settings.model_copy(update={"server": server})
    return settings


def run_standalone(
    handler: Callable[[argparse.Namespace, config.Settings], int], args: argparse.Namespace
) -> int:
    """A command of a module of its own: load the settings, run it, one-line errors."""
    try:
        settings = load_settings(args)
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    return reported(lambda: handler(args, settings))


def reported(command: Callable[[], int]) -> int:
    """Run a command; its failures become one line on stderr and an exit status."""
    try:
        return command()
    except CommandError as e:
        message = str(e)
    except CoreError as e:
        message = str(e) or type(e).__name__
    except BrokenPipeError:
        # The reader went away (kith ... | head); don't complain about it at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as e:
        message = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
    except KeyboardInterrupt:
        return 130
    print(f"kith: error: {message}", file=sys.stderr)
    return 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line; a usage error exits with status 2."""
    args = build_parser().parse_args(argv)
    if args.check is not None and (problem := args.check(args)):
        args.parser.error(problem)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return e.code if isinstance(e.code, int) else 2
    if args.command == "check-config":
        return check_config(getattr(args, "config", None))
    if args.command == "policy" and getattr(args, "standalone", None) is None:
        return run_policy(getattr(args, "config", None), getattr(args, "data_dir", None))
    if (standalone := getattr(args, "standalone", None)) is not None:
        return run_standalone(standalone, args)
    try:
        settings = settings_from(args, os.environ)
    except config.ConfigError as e:
        print(f"kith: error: {e}", file=sys.stderr)
        return 1
    return reported(lambda: run(args, settings))


if __name__ == "__main__":
    sys.exit(main())
