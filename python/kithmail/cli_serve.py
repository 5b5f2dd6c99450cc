"""``kith serve``: every listener of the gateway, until SIGTERM or SIGINT.

Runs on the embedded default when no config file is given (data in
``./var``, local domain ``example.test``, Maildirs under ``./var/mail``).
"""

from __future__ import annotations

import argparse
from typing import Any

from kithmail import CoreError, config


def _serve(args: argparse.Namespace, settings: config.Settings) -> int:
    from kithmail.cli import CommandError
    from kithmail.db import SchemaTooNewError
    from kithmail.smtp.serve import serve_gateway

    try:
        return serve_gateway(settings, test_hooks=args.test_hooks)
    except CoreError as e:
        raise CommandError(str(e)) from e
    except SchemaTooNewError as e:  # data written by a newer kithmail: docs/upgrade.md
        raise CommandError(str(e)) from e
    except OSError as e:
        raise CommandError(f"cannot start: {e.strerror or e}") from e


def add_commands(
    commands: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    help = "run the gateway: inbound SMTP, delivery queue, policy service, /metrics"
    p = commands.add_parser(
        "serve",
        help=help,
        description=help[0].upper() + help[1:] + ", until SIGTERM or SIGINT.",
        parents=[common],
    )
    p.add_argument(
        "--test-hooks",
        action="store_true",
        help="for tests only: a clock the tests move through DATA_DIR/test-clock",
    )
    p.set_defaults(standalone=_serve, handler=None, parser=p, check=None)
