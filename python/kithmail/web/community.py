"""A user's community from the web: list, add, remove, import a CSV, export one.

The entries live in the core's community table (`kithmail._core`,
``core.community``), keyed by the user's folded address; this module only
checks, folds and records. Who may touch whose community is decided by the
caller (`kithmail.web.mail.target_user`); an entry added by the user is of
source ``manual``, by an admin for someone else ``admin``, by an import
``import``. Every change is in the audit log.

A CSV import is bounded in size by the caller (``[web] max_upload``) and in
lines here; it is all or nothing, and every bad line is named
(`CsvError.errors`). Exported cells that a spreadsheet would run as a
formula (starting ``=``, ``+``, ``-``) get a leading ``'``, which an
import takes off again.
Standards: RFC 4180 (CSV), OWASP's CSV injection advice.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Final, Literal

from kithmail._core import CoreError, normalize_entry
from kithmail.web.auth import Principal
from kithmail.web.services import Services

__all__ = [
    "CsvError",
    "Entry",
    "EntryError",
    "Kind",
    "add",
    "entries",
    "import_entries",
    "parse_csv",
    "remove",
    "to_csv",
]

Kind = Literal["allow", "block"]
MAX_LINES: Final = 20_000
MAX_ERRORS: Final = 20
MAX_ENTRY: Final = 400


class EntryError(ValueError):
    """A bad entry, or one that is not there; the message is for people."""


class CsvError(ValueError):
    """An import with bad lines; ``errors`` names each (up to `MAX_ERRORS`)."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Entry:
    entry: str
    kind: str
    source: str
    added: int


def entries(services: Services, user: str) -> list[Entry]:
    """Every entry of ``user``'s community, allowed and blocked, in the table's order."""
    return [Entry(e.entry, e.kind, e.source, e.added) for e in services.core.community.list(user)]


def fold(entry: str) -> str:
    """An entry as the table keeps it; `EntryError` naming what is wrong."""
    text = entry.strip()
    if not text:
        raise EntryError("Give an address, @domain or list:<list-id>.")
    if len(text) > MAX_ENTRY:
        raise EntryError(f"An entry has at most {MAX_ENTRY} characters.")
    try:
        return normalize_entry(text)
    except (CoreError, ValueError) as e:
        raise EntryError(f"Not an address, @domain or list:<list-id>: {e}") from None


def _source(
    p: Principal, user: str, default: Literal["manual", "import"]
) -> Literal["manual", "import", "admin"]:
    return default if user == p.address else "admin"


def _tenant(services: Services, p: Principal, user: str) -> str:
    """The tenant the audit files a change under: the user's, not the acting admin's."""
    if user == p.address:
        return p.tenant
    found = services.database.find_user(user)
    return found.tenant if found is not None else ""


def add(services: Services, p: Principal, user: str, entry: str, kind: Kind) -> tuple[bool, str]:
    """Add (or move between allow and block) one entry; (changed, folded entry). Blocking."""
    folded = fold(entry)
    changed = services.core.community.add(
        user, folded, kind, _source(p, user, "manual"), int(services.clock())
    )
    services.database.audit(
        p.actor,
        f"community.{kind}",
        tenant=_tenant(services, p, user),
        target=user,
        detail=f"entry={folded}" + ("" if changed else " (already there)"),
    )
    return bool(changed), folded


def remove(services: Services, p: Principal, user: str, entry: str) -> str:
    """Remove one entry; `EntryError` when it is not there. Blocking."""
    folded = fold(entry)
    if not services.core.community.remove(user, folded):
        raise EntryError(f"{folded} is not in the community.")
    services.database.audit(
        p.actor,
        "community.remove",
        tenant=_tenant(services, p, user),
        target=user,
        detail=f"entry={folded}",
    )
    return folded


def parse_csv(data: bytes) -> list[str]:
    """The entries of an import file, folded, first occurrence kept; `CsvError` for bad lines.

    One entry per line, or a CSV whose first column is the entry; ``#``
    comments and blank lines are skipped, and so is a header row (a first
    row whose first cell cannot be an entry, such as ``entry,kind``).
    """
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's CSV export starts with a BOM
    except UnicodeDecodeError as e:
        raise CsvError([f"The file is not UTF-8 text (bad byte at offset {e.start})."]) from None
    found: dict[str, None] = {}
    errors: list[str] = []
    bad = 0
    first = True
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if reader.line_num > MAX_LINES:
                raise CsvError([f"The file has more than {MAX_LINES} lines."])
            cell = row[0].strip() if row else ""
            if cell.startswith("'"):
                cell = cell[1:]
            if not cell or cell.startswith("#"):
                continue
            if first and "@" not in cell and not cell.lower().startswith("list:"):
                first = False
                continue
            first = False
            try:
                found.setdefault(fold(cell), None)
            except EntryError as e:
                bad += 1
                if len(errors) < MAX_ERRORS:
                    errors.append(f"Line {reader.line_num}: {e}")
    except csv.Error as e:
        raise CsvError([f"Line {reader.line_num}: unreadable CSV ({e})."]) from None
    if bad > len(errors):
        errors.append(f"… and {bad - len(errors)} more bad lines.")
    if errors:
        raise CsvError(errors)
    if not found:
        raise CsvError(["The file has no entries."])
    return list(found)


def import_entries(
    services: Services, p: Principal, user: str, folded: list[str], kind: Kind
) -> int:
    """Add checked entries at once (source ``import``); how many were new or changed. Blocking."""
    changed = int(
        services.core.community.add_many(
            user, folded, kind, _source(p, user, "import"), int(services.clock())
        )
    )
    services.database.audit(
        p.actor,
        "community.import",
        tenant=_tenant(services, p, user),
        target=user,
        detail=f"kind={kind} entries={len(folded)} changed={changed}",
    )
    return changed


def _cell(text: str) -> str:
    return "'" + text if text[:1] in ("=", "+", "-", "\t", "\r") else text


def to_csv(items: list[Entry]) -> str:
    """``entry,kind,source,added`` (added as ISO 8601, UTC), one row per entry."""
    import datetime

    out = io.StringIO(newline="")
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(["entry", "kind", "source", "added"])
    for e in items:
        added = datetime.datetime.fromtimestamp(e.added, datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        w.writerow([_cell(e.entry), e.kind, e.source, added])
    return out.getvalue()
