"""A user's own account from the web: the password and the digest preference.

A password change needs the current password, is counted against the
failed-login limits like a login (it is one), and ends every session of
the user — the one that asked gets a fresh session in their place — so a
stolen session dies with the old password. The digest preference is the
``user_prefs.digest`` column that the daily digest reads (a user with no
row gets the digest).
Standards: RFC 9106 (argon2id, through `kithmail.db`).
"""

from __future__ import annotations

import asyncio

from fastapi import Request

from kithmail import digest
from kithmail.db import Database, InvalidError
from kithmail.web.auth import (
    LoginLimiter,
    Principal,
    create_session,
    end_sessions,
    services_of,
)

__all__ = ["PasswordError", "change_password", "digest_enabled", "set_digest"]


class PasswordError(Exception):
    """The password was not changed: the HTTP status and a sentence for people."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def digest_enabled(database: Database, user_id: int) -> bool:
    """Whether the user gets the daily digest (the digest module's rule)."""
    return digest.wants(database, user_id)


def set_digest(database: Database, user_id: int, on: bool, *, actor: str) -> None:
    """Turn the user's digest on or off; audit-logged by the digest module."""
    digest.set_wants(database, user_id, on, actor=actor)


async def change_password(
    request: Request, p: Principal, current: str, new: str, *, fresh_session: bool = True
) -> str:
    """Check ``current``, set ``new``, end every session; the secret of a fresh session.

    ``fresh_session`` False (an API token asked): no new session, and "" returned.

    `PasswordError`: 429 past the failed-login limits, 403 for a wrong
    current password, 400 for a new one the database refuses (its length).
    """
    services = services_of(request)
    web = services.settings().web
    limiter: LoginLimiter = request.app.state.login_limiter
    ip = request.client.host if request.client is not None else "?"
    wait = limiter.blocked(
        ip,
        p.address,
        window=web.login_window,
        per_ip=web.login_failures_per_ip,
        per_account=web.login_failures_per_account,
    )
    if wait > 0:
        raise PasswordError(429, "too_many_requests", "Too many wrong passwords; try again later.")
    db = services.database
    user = await asyncio.to_thread(db.verify_password, p.address, current)
    if user is None or user.id != p.user_id:
        limiter.failed(ip, p.address)
        raise PasswordError(403, "wrong_password", "The current password is not right.")
    if new == current:
        raise PasswordError(400, "invalid", "The new password is the same as the current one.")
    now = int(services.clock())

    def change() -> str:
        try:
            changed = db.set_password(p.address, new)
        except InvalidError as e:
            raise PasswordError(
                400, "invalid", f"The new password is not acceptable: {e}."
            ) from None
        end_sessions(db, p.user_id)
        db.audit(p.actor, "user.password", tenant=p.tenant, target=p.address)
        if not fresh_session:
            return ""
        secret, _ = create_session(db, changed, now=now, ttl_s=web.session_ttl)
        return secret

    return await asyncio.to_thread(change)
