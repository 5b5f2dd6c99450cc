"""`kith` run as an operator would from a shell, for the CLI tests.

The `kith` beside this interpreter (make build puts it there), in a given
directory, with the environment of the test run minus KITHMAIL_DATA_DIR
(so only what a test passes names the data directory).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kithmail.db import Database

__all__ = ["KITH", "Kith", "Run", "databases", "run_kith"]

KITH = Path(sys.executable).parent / "kith"


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


Kith = Callable[..., Run]


def run_kith(
    argv: Sequence[str],
    *,
    cwd: Path,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Run:
    """``kith ARGV...`` to its end (60 s at most); exit status, stdout and stderr."""
    assert KITH.exists(), f"{KITH} is missing: run `make build`"
    base = {k: v for k, v in os.environ.items() if k != "KITHMAIL_DATA_DIR"}
    p = subprocess.run(
        [str(KITH), *argv],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, **(env or {})},
        timeout=60,
        check=False,
    )
    return Run(p.returncode, p.stdout, p.stderr)


@contextlib.contextmanager
def databases(data_dir: Path) -> Iterator[Callable[[], Database]]:
    """Open kithmail.db as the server would (after the commands made it); all closed after."""
    opened: list[Database] = []

    def open_() -> Database:
        d = Database.open(data_dir / "kithmail.db")
        opened.append(d)
        return d

    try:
        yield open_
    finally:
        for d in opened:
            d.close()
