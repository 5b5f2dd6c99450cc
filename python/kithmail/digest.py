"""The quarantine digest: a daily mail to each user listing what was newly held for them.

This first part holds the per-user preference (``user_prefs.digest``, schema
3 in `kithmail.db`): `wants` and `set_wants`, which the account page calls.
A user with no ``user_prefs`` row wants the digest (the column's default).
Every change of the preference is written to the audit log with who did it.

Trusts: the database; ``user_id`` is looked up, never interpolated.
"""

from __future__ import annotations

import time
from typing import Final

from kithmail.db import Database, NotFoundError

__all__ = ["set_wants", "wants"]

AUDIT_ACTION: Final = "digest.preference"


def wants(database: Database, user_id: int) -> bool:
    """Whether the user wants the digest (True when they never said; the schema's default)."""
    rows = database.read("SELECT digest FROM user_prefs WHERE user_id = ?", (int(user_id),))
    return True if not rows else bool(rows[0][0])


def set_wants(
    database: Database,
    user_id: int,
    wanted: bool,
    *,
    actor: str,
    now: float | None = None,
) -> None:
    """Turn the user's digest on or off, and audit it; NotFoundError when there is no such user.

    Blocks on a database write: call it in a thread from async code.
    """
    at = int(time.time() if now is None else now)
    with database.write() as conn:
        row = conn.execute(
            "SELECT users.address, tenants.name FROM users JOIN tenants"
            " ON tenants.id = users.tenant WHERE users.id = ?",
            (int(user_id),),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no user with id {user_id}")
        address, tenant = str(row[0]), str(row[1])
        conn.execute(
            "INSERT INTO user_prefs (user_id, digest) VALUES (?, ?)"
            " ON CONFLICT (user_id) DO UPDATE SET digest = excluded.digest",
            (int(user_id), int(bool(wanted))),
        )
        conn.execute(
            "INSERT INTO audit_log (at, actor, tenant, action, target, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (at, actor, tenant, AUDIT_ACTION, address, "on" if wanted else "off"),
        )
