"""Who is asking: server-side sessions, API tokens, login limits, and who may see whom.

A browser logs in with its mail address and password (`login`); the answer
sets the cookie ``kith_session`` to 256 random bits, and the database's
``sessions`` table keeps only their SHA-256 (so a copy of the database
opens no session), beside a CSRF token and a fingerprint of the user's
password hash at login. Every request joins the session to its user, so a
session is dead the moment its user is disabled or removed (ON DELETE
CASCADE), or their password hash changes — by the web, by an admin or by
``kith user passwd`` from the shell, even within the same second (the
fingerprint, not the ``password_changed`` second, is compared) — and when
it passes ``[web] session_ttl`` since login or ``idle_timeout`` since its
last use. Logout and a password change delete the rows as well.

Scripts use API tokens (``Authorization: Bearer kith_…``), made by an
admin (`create_api_token`) and stored likewise as a hash; a token carries
no ambient authority (a browser never sends it by itself), so token
requests need no CSRF token. When a request carries an ``Authorization``
header, only it counts: the cookie is ignored.

Failed logins are counted in memory (the web is served by one process) per
client IP and per account over ``[web] login_window``; past either limit a
login is refused with 429 before any password is checked. A wrong password
and an unknown or disabled user get the same answer after the same work
(`kithmail.db.Database.verify_password` spends one argon2 verification on
each).

Trusts: the database. Nothing of a request: the cookie and token are looked
up by their hash only, bounded in length first.
Standards: RFC 6265 (cookies: HttpOnly, SameSite=Lax, Secure over TLS),
RFC 6750 (bearer tokens), RFC 6585 (429), RFC 9106 (argon2id).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Final, Literal, cast

from fastapi import Request, Security
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from kithmail.db import Database, Role, User

if TYPE_CHECKING:
    from kithmail.web.services import Services

__all__ = [
    "COOKIE",
    "ApiToken",
    "Forbidden",
    "LoginLimiter",
    "LoginRequired",
    "Principal",
    "create_api_token",
    "create_session",
    "end_session",
    "end_sessions",
    "global_admin",
    "list_api_tokens",
    "may_manage_tenant",
    "may_see_user",
    "principal",
    "revoke_api_token",
    "tenant_admin",
]

COOKIE: Final = "kith_session"
TOKEN_PREFIX: Final = "kith_"
MAX_SECRET: Final = 128  # characters of a cookie or token looked at; ours have 43 (+5)
# last_seen and last_used are written at most this often per session/token.
TOUCH_EVERY_S: Final = 60


class LoginRequired(Exception):
    """No valid session or token: pages redirect to /login, the API answers 401."""


class Forbidden(Exception):
    """Logged in, but not allowed here: 403."""

    def __init__(self, detail: str = "you are not allowed to do that") -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Principal:
    """The logged-in user a request acts for."""

    user_id: int
    address: str
    tenant: str
    role: Role
    via: Literal["session", "token"]
    csrf: str  # "" for token auth: nothing to forge without an ambient credential

    @property
    def is_admin(self) -> bool:
        """A tenant admin or a global admin."""
        return self.role in ("tenant_admin", "global_admin")

    @property
    def is_global(self) -> bool:
        return self.role == "global_admin"

    @property
    def actor(self) -> str:
        """How the audit log names this principal: ``web:ann@x`` or ``api:ann@x``."""
        return f"{'web' if self.via == 'session' else 'api'}:{self.address}"


def may_manage_tenant(p: Principal, tenant: str) -> bool:
    """A global admin manages every tenant; a tenant admin only their own."""
    return p.is_global or (p.role == "tenant_admin" and p.tenant == tenant)


def may_see_user(p: Principal, user: User) -> bool:
    """The user themself, a tenant admin of the user's tenant, or a global admin."""
    return p.user_id == user.id or may_manage_tenant(p, user.tenant)


# ---------------------------------------------------------------- hashing


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _fingerprint(password_hash: str) -> int:
    """A 63-bit fingerprint of a password hash: any new password (new salt) changes it."""
    return int.from_bytes(hashlib.sha256(password_hash.encode()).digest()[:8], "big") >> 1


# ---------------------------------------------------------------- sessions

_SESSION_SQL = (
    "SELECT sessions.user_id, sessions.csrf, sessions.password_changed, sessions.created,"
    " sessions.last_seen, sessions.expires_at, users.address, tenants.name, users.role,"
    " users.disabled, users.password_hash"
    " FROM sessions JOIN users ON users.id = sessions.user_id"
    " JOIN tenants ON tenants.id = users.tenant WHERE sessions.id = ?"
)


@dataclass(frozen=True, slots=True)
class _Session:
    id: str  # the hash, as stored
    principal: Principal
    last_seen: int


def create_session(database: Database, user: User, *, now: int, ttl_s: float) -> tuple[str, str]:
    """A new session for ``user``: (the cookie's secret, the CSRF token). Blocking (a write)."""
    secret = secrets.token_urlsafe(32)
    token = secrets.token_urlsafe(32)
    rows = database.read("SELECT password_hash FROM users WHERE id = ?", (user.id,))
    if not rows:
        raise LookupError(f"no user {user.address}")
    with database.write() as conn:
        conn.execute(
            "INSERT INTO sessions (id, user_id, csrf, password_changed, created, last_seen,"
            " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                _digest(secret),
                user.id,
                token,
                _fingerprint(cast(str, rows[0][0])),
                now,
                now,
                now + int(ttl_s),
            ),
        )
        # Expired sessions of anyone go while we hold the lock anyway (indexed).
        conn.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
    return secret, token


def end_session(database: Database, secret: str) -> None:
    """Delete the session whose cookie is ``secret`` (logout). Blocking."""
    with database.write() as conn:
        conn.execute("DELETE FROM sessions WHERE id = ?", (_digest(secret[:MAX_SECRET]),))


def end_sessions(database: Database, user_id: int, *, keep: str | None = None) -> int:
    """Delete every session of a user (but the one whose cookie is ``keep``); how many. Blocking."""
    with database.write() as conn:
        if keep is None:
            cur = conn.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,))
        else:
            cur = conn.execute(
                "DELETE FROM sessions WHERE user_id = ? AND id != ?",
                (user_id, _digest(keep[:MAX_SECRET])),
            )
        return cur.rowcount


def _lookup_session(
    database: Database, secret: str, *, now: int, idle_s: float
) -> _Session | str | None:
    """The live session of this cookie; the id of a dead one (to delete); None if none."""
    if not secret or len(secret) > MAX_SECRET:
        return None
    sid = _digest(secret)
    rows = database.read(_SESSION_SQL, (sid,))
    if not rows:
        return None
    (uid, csrf, fp, _created, last_seen, expires, address, tenant, role, disabled, pw) = rows[0]
    if (
        disabled
        or cast(int, fp) != _fingerprint(cast(str, pw))
        or cast(int, expires) <= now
        or cast(int, last_seen) + idle_s <= now
    ):
        # Dead for good: enabling the user again must not revive it.
        return sid
    p = Principal(
        cast(int, uid),
        cast(str, address),
        cast(str, tenant),
        cast(Role, role),
        "session",
        cast(str, csrf),
    )
    return _Session(sid, p, cast(int, last_seen))


def _delete_session(database: Database, sid: str) -> None:
    with database.write() as conn:
        conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))


def _touch_session(database: Database, sid: str, now: int) -> None:
    with database.write() as conn:
        conn.execute("UPDATE sessions SET last_seen = ? WHERE id = ?", (now, sid))


# ---------------------------------------------------------------- API tokens


@dataclass(frozen=True, slots=True)
class ApiToken:
    """An API token as listed (never its secret); times are Unix seconds, 0 for never."""

    id: int
    name: str
    user_id: int
    address: str
    created: int
    last_used: int
    expires_at: int


MAX_TOKEN_NAME: Final = 100


def create_api_token(
    database: Database, user_id: int, name: str, *, ttl_s: int | None, now: int | None = None
) -> str:
    """A new API token acting as ``user_id``; returns its secret, shown once. Blocking.

    ``ttl_s`` None: it never expires. ValueError for an empty or overlong name.
    """
    name = " ".join(name.split())
    if not name or len(name) > MAX_TOKEN_NAME:
        raise ValueError(f"a token's name has 1 to {MAX_TOKEN_NAME} characters")
    if ttl_s is not None and ttl_s <= 0:
        raise ValueError("a token's lifetime is positive")
    t = int(time.time() if now is None else now)
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with database.write() as conn:
        if conn.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone() is None:
            raise LookupError(f"no user with id {user_id}")
        conn.execute(
            "INSERT INTO api_tokens (token_hash, name, user_id, created, expires_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (_digest(secret), name, user_id, t, 0 if ttl_s is None else t + int(ttl_s)),
        )
    return secret


def list_api_tokens(database: Database, user_id: int | None) -> list[ApiToken]:
    """The tokens of one user (None: every token), newest first."""
    sql = (
        "SELECT api_tokens.id, api_tokens.name, api_tokens.user_id, users.address,"
        " api_tokens.created, api_tokens.last_used, api_tokens.expires_at"
        " FROM api_tokens JOIN users ON users.id = api_tokens.user_id"
    )
    params: tuple[object, ...] = ()
    if user_id is not None:
        sql += " WHERE api_tokens.user_id = ?"
        params = (user_id,)
    rows = database.read(sql + " ORDER BY api_tokens.created DESC, api_tokens.id DESC", params)
    return [
        ApiToken(
            cast(int, i),
            cast(str, n),
            cast(int, u),
            cast(str, a),
            cast(int, c),
            cast(int, lu),
            cast(int, e),
        )
        for i, n, u, a, c, lu, e in rows
    ]


def revoke_api_token(database: Database, token_id: int) -> None:
    """Delete a token; LookupError when there is none. Blocking."""
    with database.write() as conn:
        if conn.execute("DELETE FROM api_tokens WHERE id = ?", (token_id,)).rowcount == 0:
            raise LookupError(f"no API token {token_id}")


def _lookup_token(
    database: Database, secret: str, *, now: int
) -> tuple[int, Principal, int] | None:
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > MAX_SECRET:
        return None
    rows = database.read(
        "SELECT api_tokens.id, api_tokens.expires_at, api_tokens.last_used, users.id,"
        " users.address, tenants.name, users.role, users.disabled"
        " FROM api_tokens JOIN users ON users.id = api_tokens.user_id"
        " JOIN tenants ON tenants.id = users.tenant WHERE api_tokens.token_hash = ?",
        (_digest(secret),),
    )
    if not rows:
        return None
    tid, expires, last_used, uid, address, tenant, role, disabled = rows[0]
    if disabled or (cast(int, expires) and cast(int, expires) <= now):
        return None
    p = Principal(
        cast(int, uid), cast(str, address), cast(str, tenant), cast(Role, role), "token", ""
    )
    return cast(int, tid), p, cast(int, last_used)


def _touch_token(database: Database, token_id: int, now: int) -> None:
    with database.write() as conn:
        conn.execute("UPDATE api_tokens SET last_used = ? WHERE id = ?", (now, token_id))


# ---------------------------------------------------------------- the dependencies


def services_of(request: Request) -> Services:
    return cast("Services", request.app.state.services)


def _now(request: Request) -> int:
    return int(services_of(request).clock())


async def optional_principal(request: Request) -> Principal | None:
    """The principal of a request, or None; looked up once per request."""
    if hasattr(request.state, "principal"):
        return cast("Principal | None", request.state.principal)
    found = await _resolve(request)
    request.state.principal = found
    return found


async def _resolve(request: Request) -> Principal | None:
    services = services_of(request)
    database = services.database
    now = _now(request)
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        found = _lookup_token(database, secret.strip(), now=now)
        if found is None:
            return None
        tid, p, last_used = found
        if now - last_used >= TOUCH_EVERY_S:
            await asyncio.to_thread(_touch_token, database, tid, now)
        return p
    secret = request.cookies.get(COOKIE, "")
    web = services.settings().web
    session = _lookup_session(database, secret, now=now, idle_s=web.idle_timeout)
    if session is None:
        return None
    if isinstance(session, str):
        await asyncio.to_thread(_delete_session, database, session)
        return None
    request.state.session_secret = secret
    if now - session.last_seen >= min(TOUCH_EVERY_S, web.idle_timeout / 4):
        await asyncio.to_thread(_touch_session, database, session.id, now)
    return session.principal


# For the OpenAPI document only: the two ways in (checked by `optional_principal`).
_BEARER: Final = HTTPBearer(
    auto_error=False, scheme_name="token", description="An API token: Bearer kith_…"
)
_COOKIE: Final = APIKeyCookie(
    name=COOKIE,
    auto_error=False,
    scheme_name="session",
    description="The browser's session (state changes also need X-CSRF-Token)",
)


async def principal(
    request: Request,
    _token: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)] = None,
    _session: Annotated[str | None, Security(_COOKIE)] = None,
) -> Principal:
    """FastAPI dependency: the logged-in user (session cookie or bearer token).

    None logged in: `LoginRequired`, which the app answers with a redirect
    to /login for pages and 401 for /api.
    """
    p = await optional_principal(request)
    if p is None:
        raise LoginRequired()
    return p


async def tenant_admin(
    request: Request,
    _token: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)] = None,
    _session: Annotated[str | None, Security(_COOKIE)] = None,
) -> Principal:
    """FastAPI dependency: a tenant admin or a global admin, else 403."""
    p = await principal(request)
    if not p.is_admin:
        raise Forbidden("administrators only")
    return p


async def global_admin(
    request: Request,
    _token: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)] = None,
    _session: Annotated[str | None, Security(_COOKIE)] = None,
) -> Principal:
    """FastAPI dependency: a global admin, else 403."""
    p = await principal(request)
    if not p.is_global:
        raise Forbidden("global administrators only")
    return p


# ---------------------------------------------------------------- failed logins


class LoginLimiter:
    """Failed logins per IP and per account in a sliding window, in memory.

    ``clock`` is the server's (tests move it). Bounded: at most
    ``max_keys`` IPs and accounts are tracked; past that the oldest are
    forgotten, which only ever errs towards letting a login be tried.
    """

    def __init__(self, clock: Callable[[], float], max_keys: int = 100_000) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._fails: dict[str, deque[float]] = {}

    def _recent(self, key: str, window: float, now: float) -> int:
        q = self._fails.get(key)
        if q is None:
            return 0
        while q and q[0] <= now - window:
            q.popleft()
        if not q:
            del self._fails[key]
            return 0
        return len(q)

    def blocked(
        self, ip: str, account: str, *, window: float, per_ip: int, per_account: int
    ) -> float:
        """0 when a login may be tried; else the seconds until one may."""
        now = self._clock()
        with self._lock:
            waits = []
            for key, limit in ((f"ip:{ip}", per_ip), (f"acct:{account}", per_account)):
                if self._recent(key, window, now) >= limit:
                    waits.append(self._fails[key][0] + window - now)
            return max(waits, default=0.0)

    def failed(self, ip: str, account: str) -> None:
        now = self._clock()
        with self._lock:
            for key in (f"ip:{ip}", f"acct:{account}"):
                q = self._fails.get(key)
                if q is None:
                    while len(self._fails) >= self._max_keys:
                        del self._fails[next(iter(self._fails))]
                    q = self._fails[key] = deque(maxlen=10_000)
                q.append(now)

    def succeeded(self, account: str) -> None:
        with self._lock:
            self._fails.pop(f"acct:{account}", None)


def same_secret(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets (False when either is empty)."""
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())
