"""A real small disk for the full-disk tests: a tmpfs of our own (the tests run as root).

`tmpfs(d, "size=1m")` mounts one at `d` (made here; its parents may be
made too) and unmounts it afterwards; `nr_inodes=N` runs out of inodes
instead. A mount that fails fails the test: it is never skipped.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(d: Path, options: str) -> Iterator[Path]:
    d.mkdir(parents=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode:
        pytest.fail(f"cannot mount a tmpfs (the tests run as root): {r.stderr.strip()}")
    try:
        yield d
    finally:
        # Lazily: a server killed by the test may still hold a file open.
        subprocess.run(["umount", "-l", str(d)], check=True)
