"""``kith`` command groups of the gateway, each in a module of its own.

Every group module has ``add_commands(commands, common)``: it adds its
parsers to ``commands`` (with ``common``, the ``-c``/``--data-dir`` options,
as a parent) and sets ``standalone=<function(args, settings) -> int>`` on
each leaf, which ``kith`` runs with the loaded settings. Errors are raised as
`kithmail.cli.CommandError` (one line, exit 1).
"""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(
    commands: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """Add every gateway command group (users, tenants, queue, serve)."""
    import importlib

    for name in (
        "kithmail.cli_users",
        "kithmail.cli_queue",
        "kithmail.cli_quarantine",
        "kithmail.cli_serve",
        "kithmail.cli_dkim",
        "kithmail.cli_digest",
        "kithmail.cli_policy",
        "kithmail.cli_backup",
    ):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # that group is not built yet
        module.add_commands(commands, common)
