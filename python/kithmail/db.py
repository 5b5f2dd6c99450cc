"""The control-plane database: tenants, their domains, and users.

SQLite in WAL mode at ``<data_dir>/kithmail.db``, behind this one narrow
module so that PostgreSQL can serve a cluster later. Several processes open
the same file at once (the server's workers and the ``kith`` command); every
write is one short ``BEGIN IMMEDIATE`` transaction, so they serialise on
SQLite's write lock and never deadlock, and readers never wait for writers.

Schema versions: ``PRAGMA user_version`` counts the entries of `MIGRATIONS`
applied; `Database.open` applies the missing ones in one transaction, and a
file newer than this code is refused (`SchemaTooNewError`). To change the
schema, append a function to `MIGRATIONS`; never edit one that has shipped.

Threads: the server calls the read methods (`tenant_of`, `find_user`) on
its event-loop thread and the writes through `asyncio.to_thread`. Each
thread gets its own connection (`threading.local`) rather than all sharing
one behind a lock: with a shared connection, a write waiting out
``busy_timeout`` for another process's write lock would hold the lock and
stall every RCPT on the event loop; with one per thread, WAL lets the
loop's reads go on. Measured on this machine, `find_user`'s query costs the
same either way (~5 µs of its ~13), so nothing is given up for it. Open
the database after any fork: a connection must not cross one.

Trusts nothing it is given: every address is checked to be a plain
``local@domain`` and folded exactly as the core folds it
(`kithmail._core.normalize_entry`: lower case, IDN domains as A-labels), so
``Ann@Example.TEST`` and ``ann@example.test`` are one user. Passwords are
stored only as argon2id hashes and checked in constant time.

Standards: RFC 5321 §4.1.2 and §4.5.3.1 (address syntax and length
limits), RFC 6531 (UTF-8 local parts), RFC 5891 (IDNA A-labels), RFC 5233
(``+tag`` sub-addresses), RFC 9106 (argon2id).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, cast

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from kithmail._core import InvalidInputError, normalize_entry

__all__ = [
    "MIGRATIONS",
    "ROLES",
    "ConflictError",
    "Database",
    "DatabaseError",
    "InvalidError",
    "NotFoundError",
    "Role",
    "SchemaTooNewError",
    "Tenant",
    "User",
    "fold_address",
    "fold_domain",
    "fold_tenant",
    "generate_password",
]

Role = Literal["user", "tenant_admin", "global_admin"]
ROLES: Final[tuple[Role, ...]] = ("user", "tenant_admin", "global_admin")

DEFAULT_TENANT: Final = "default"
# How long a write waits for another process's write lock. Writes are short
# (argon2 hashing is done before the transaction starts), so this is only
# ever reached when something is badly wrong.
BUSY_TIMEOUT_S: Final = 10.0
# How stale tenant_of's domain map may be: a `kith tenant domain` run from
# the shell reaches a running server within this long.
DOMAIN_REFRESH_S: Final = 1.0
MIN_PASSWORD: Final = 8
MAX_PASSWORD: Final = 1024
# Local parts the gateway answers itself (DESIGN.md: SAV replies come to
# sav+<token>@domain before any user lookup), so no user may own them.
RESERVED_LOCAL_PARTS: Final = frozenset({"sav"})


# --- errors ----------------------------------------------------------------------------------


class DatabaseError(Exception):
    """Base of every error of this module; the message is for an operator."""


class SchemaTooNewError(DatabaseError):
    """The file was written by a newer kithmail than this one."""


class NotFoundError(DatabaseError):
    """No such user or tenant."""


class ConflictError(DatabaseError):
    """The user or tenant exists already (or another rule of uniqueness)."""


class InvalidError(DatabaseError, ValueError):
    """A malformed address, domain, name, role or password; the message names it."""


# --- values ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tenant:
    """An organisation: its local domains (folded, sorted) and how many users it has."""

    id: int
    name: str
    created: int
    domains: tuple[str, ...]
    users: int


@dataclass(frozen=True, slots=True)
class User:
    """A local user; ``address`` is folded, times are Unix seconds."""

    id: int
    address: str
    tenant: str
    role: Role
    disabled: bool
    created: int
    password_changed: int

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]


# --- addresses -------------------------------------------------------------------------------

# A dot-atom local part (RFC 5321 §4.1.2) of atext, plus UTF-8 (RFC 6531),
# without `%` and `!`: those two are old relay syntaxes ("user%host@relay",
# "host!user"), and refusing them here means no user can ever be named so
# that a downstream MTA reads it as a route.
_ATOM = r"[A-Za-z0-9#$&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_LOCAL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")


def fold_domain(domain: str) -> str:
    """``domain`` as the core folds it (lower case, A-labels); InvalidError if it is not one.

    A trailing dot, a domain literal (``[192.0.2.1]``) and anything longer
    than 255 octets are refused.
    """
    if not isinstance(domain, str) or not domain or "@" in domain:
        raise InvalidError(f"invalid domain {domain!r}")
    if domain.endswith("."):
        raise InvalidError(f"invalid domain {domain!r}: a trailing dot")
    if domain.startswith("["):
        raise InvalidError(f"invalid domain {domain!r}: address literals are not local domains")
    try:
        folded = normalize_entry("@" + domain)[1:]
    except InvalidInputError:
        raise InvalidError(f"invalid domain {domain!r}") from None
    if len(folded) > 255:
        raise InvalidError(f"invalid domain {domain!r}: longer than 255 octets")
    return folded


def fold_address(address: str) -> str:
    """A plain ``local@domain`` folded as the core folds it; InvalidError for anything else.

    Refused: quoted local parts, ``@``, ``%`` or ``!`` in the local part,
    source routes (``@a,@b:user@c``), address literals, a trailing dot,
    leading, trailing or doubled dots in the local part, white space and
    control characters, a local part over 64 octets or a domain over 255
    (RFC 5321 §4.5.3.1.1 and .2).
    """
    if not isinstance(address, str):
        raise InvalidError(f"invalid address {address!r}")
    if address.count("@") != 1:
        why = "no @" if "@" not in address else "@ in the local part, or a source route"
        raise InvalidError(f"invalid address {address!r}: {why}")
    local, _, domain = address.partition("@")
    if not local:
        raise InvalidError(f"invalid address {address!r}: empty local part")
    if not _LOCAL.fullmatch(local):
        raise InvalidError(
            f"invalid address {address!r}: the local part must be plain "
            "(no quotes, white space, %, !, or stray dots)"
        )
    if len(local.encode()) > 64:
        raise InvalidError(f"invalid address {address!r}: local part longer than 64 octets")
    try:
        folded_domain = fold_domain(domain)
    except InvalidError as e:
        raise InvalidError(f"invalid address {address!r}: {e}") from None
    try:
        folded = normalize_entry(f"{local}@{folded_domain}")
    except InvalidInputError as e:
        raise InvalidError(str(e)) from None
    return folded


def _untagged(folded: str) -> str | None:
    """The address without its ``+tag`` (``ann+news@x`` → ``ann@x``); None when untagged."""
    local, _, domain = folded.rpartition("@")
    base, plus, _ = local.partition("+")
    if not plus or not base:
        return None
    return f"{base}@{domain}"


def generate_password() -> str:
    """A random password of 144 bits, in URL-safe characters (24 of them)."""
    return secrets.token_urlsafe(18)


def _check_password(password: str) -> None:
    if not isinstance(password, str):
        raise InvalidError("a password is text")
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidError(
            f"a password has {MIN_PASSWORD} to {MAX_PASSWORD} characters (this one has {len(password)})"
        )


def _check_role(role: str) -> Role:
    for known in ROLES:
        if role == known:
            return known
    raise InvalidError(f"invalid role {role!r} (one of {', '.join(ROLES)})")


_TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def fold_tenant(name: str) -> str:
    """Tenant names are short slugs, compared in lower case."""
    folded = name.lower() if isinstance(name, str) else ""
    if not _TENANT_NAME.fullmatch(folded):
        raise InvalidError(
            f"invalid tenant name {name!r} (1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit)"
        )
    return folded


# --- schema ----------------------------------------------------------------------------------

Migration = Callable[[sqlite3.Connection], None]


def _v1_tenants_domains_users(conn: sqlite3.Connection) -> None:
    """Tenants, the domain → tenant map, users; a generation counter for the map."""
    for statement in (
        """CREATE TABLE tenants (
            id      INTEGER PRIMARY KEY,
            name    TEXT NOT NULL UNIQUE,
            created INTEGER NOT NULL
        )""",
        # Which domains are local is the config's to say ([domains] local);
        # this table only says whose they are.
        """CREATE TABLE domains (
            domain TEXT PRIMARY KEY,
            tenant INTEGER NOT NULL REFERENCES tenants(id)
        ) WITHOUT ROWID""",
        "CREATE INDEX domains_by_tenant ON domains(tenant)",
        # `tenant` is the tenant of `domain`, kept so by the trigger below,
        # so that listing a tenant's users is one index range.
        """CREATE TABLE users (
            id               INTEGER PRIMARY KEY,
            address          TEXT NOT NULL UNIQUE,
            domain           TEXT NOT NULL REFERENCES domains(domain),
            tenant           INTEGER NOT NULL REFERENCES tenants(id),
            password_hash    TEXT NOT NULL,
            role             TEXT NOT NULL
                             CHECK (role IN ('user', 'tenant_admin', 'global_admin')),
            disabled         INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
            created          INTEGER NOT NULL,
            password_changed INTEGER NOT NULL
        )""",
        "CREATE INDEX users_by_tenant ON users(tenant, address)",
        "CREATE INDEX users_by_domain ON users(domain)",
        "CREATE INDEX users_by_role ON users(role)",
        """CREATE TRIGGER domain_moves_users AFTER UPDATE OF tenant ON domains BEGIN
            UPDATE users SET tenant = NEW.tenant WHERE domain = NEW.domain;
        END""",
        # tenant_of caches the map; it re-reads it only when this counter
        # moves. PRAGMA data_version would move on every commit to the file
        # (users now, quarantine and sessions later) and reload it needlessly.
        """CREATE TABLE generations (
            name TEXT PRIMARY KEY,
            n    INTEGER NOT NULL
        ) WITHOUT ROWID""",
        "INSERT INTO generations (name, n) VALUES ('domains', 0)",
        """CREATE TRIGGER domains_inserted AFTER INSERT ON domains BEGIN
            UPDATE generations SET n = n + 1 WHERE name = 'domains';
        END""",
        """CREATE TRIGGER domains_updated AFTER UPDATE ON domains BEGIN
            UPDATE generations SET n = n + 1 WHERE name = 'domains';
        END""",
        """CREATE TRIGGER domains_deleted AFTER DELETE ON domains BEGIN
            UPDATE generations SET n = n + 1 WHERE name = 'domains';
        END""",
    ):
        conn.execute(statement)


def _v2_quarantine_challenges_audit(conn: sqlite3.Connection) -> None:
    """The quarantine index, SAV challenges and the audit log.

    The quarantine index is derived from the spool (whose per-recipient
    records are the truth) and reconciled with it at start; one row per
    held recipient copy. Challenges record every SAV challenge sent or
    suppressed (the rate limits and the once-per-interval rule count
    them); a token's nonce is single-use. The audit log records who did
    what to whose mail or policy.
    """
    for statement in (
        """CREATE TABLE quarantine (
            queue_id   TEXT NOT NULL,
            rcpt_index INTEGER NOT NULL,
            tenant     TEXT NOT NULL,
            user       TEXT NOT NULL,
            sender     TEXT NOT NULL,
            from_addr  TEXT NOT NULL DEFAULT '',
            subject    TEXT NOT NULL DEFAULT '',
            date       TEXT NOT NULL DEFAULT '',
            size       INTEGER NOT NULL,
            layer      TEXT NOT NULL,
            reason     TEXT NOT NULL,
            detail     TEXT NOT NULL DEFAULT '',
            sav        TEXT NOT NULL DEFAULT '',
            held_at    INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            PRIMARY KEY (queue_id, rcpt_index)
        ) WITHOUT ROWID""",
        "CREATE INDEX quarantine_by_user ON quarantine(user, held_at)",
        "CREATE INDEX quarantine_by_sender ON quarantine(user, sender)",
        "CREATE INDEX quarantine_by_expiry ON quarantine(expires_at)",
        """CREATE TABLE challenges (
            id         INTEGER PRIMARY KEY,
            tenant     TEXT NOT NULL,
            user       TEXT NOT NULL,
            sender     TEXT NOT NULL,
            domain     TEXT NOT NULL,
            queue_id   TEXT NOT NULL,
            nonce      TEXT NOT NULL UNIQUE,
            sent_at    INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            state      TEXT NOT NULL CHECK (state IN ('sent', 'suppressed', 'verified', 'expired')),
            why        TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX challenges_by_pair ON challenges(user, sender, sent_at)",
        "CREATE INDEX challenges_by_domain ON challenges(domain, sent_at)",
        "CREATE INDEX challenges_by_time ON challenges(sent_at)",
        """CREATE TABLE audit_log (
            id      INTEGER PRIMARY KEY,
            at      INTEGER NOT NULL,
            actor   TEXT NOT NULL,
            tenant  TEXT NOT NULL DEFAULT '',
            action  TEXT NOT NULL,
            target  TEXT NOT NULL DEFAULT '',
            detail  TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX audit_by_time ON audit_log(at)",
        "CREATE INDEX audit_by_tenant ON audit_log(tenant, at)",
    ):
        conn.execute(statement)


def _v3_web_overrides_stats(conn: sqlite3.Connection) -> None:
    """Web sessions and API tokens, policy overrides, user preferences, daily stats.

    Sessions are server-side: the cookie holds a random token and the table
    its SHA-256, with the user's `password_changed` at login, so a password
    change (or a disabled or removed user) ends every session at once.
    API tokens likewise store only a hash. Overrides are DESIGN.md's global
    (scope '') and tenant (scope = tenant name) layers of policy, one row per
    dotted key (`spf.softfail`) with its value as JSON; the `overrides`
    generation moves on every change so each worker re-merges within a
    second. `stats_daily`/`stats_sources` are the dashboard's per-day
    counters, flushed from memory by each worker. `used_tokens` makes the
    digest's one-action links single use.
    """
    for statement in (
        """CREATE TABLE sessions (
            id               TEXT PRIMARY KEY,
            user_id          INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            csrf             TEXT NOT NULL,
            password_changed INTEGER NOT NULL,
            created          INTEGER NOT NULL,
            last_seen        INTEGER NOT NULL,
            expires_at       INTEGER NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX sessions_by_user ON sessions(user_id)",
        "CREATE INDEX sessions_by_expiry ON sessions(expires_at)",
        """CREATE TABLE api_tokens (
            id         INTEGER PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            name       TEXT NOT NULL,
            user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            created    INTEGER NOT NULL,
            last_used  INTEGER NOT NULL DEFAULT 0,
            expires_at INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX api_tokens_by_user ON api_tokens(user_id)",
        """CREATE TABLE overrides (
            scope      TEXT NOT NULL,
            key        TEXT NOT NULL,
            value      TEXT NOT NULL,
            changed_at INTEGER NOT NULL,
            changed_by TEXT NOT NULL,
            PRIMARY KEY (scope, key)
        ) WITHOUT ROWID""",
        "INSERT INTO generations (name, n) VALUES ('overrides', 0)",
        """CREATE TRIGGER overrides_inserted AFTER INSERT ON overrides BEGIN
            UPDATE generations SET n = n + 1 WHERE name = 'overrides';
        END""",
        """CREATE TRIGGER overrides_updated AFTER UPDATE ON overrides BEGIN
            UPDATE generations SET n = n + 1 WHERE name = 'overrides';
        END""",
        """CREATE TRIGGER overrides_deleted AFTER DELETE ON overrides BEGIN
            UPDATE generations SET n = n + 1 WHERE name = 'overrides';
        END""",
        """CREATE TABLE user_prefs (
            user_id     INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
            digest      INTEGER NOT NULL DEFAULT 1 CHECK (digest IN (0, 1)),
            digest_last INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE stats_daily (
            day    TEXT NOT NULL,
            tenant TEXT NOT NULL,
            layer  TEXT NOT NULL,
            action TEXT NOT NULL,
            n      INTEGER NOT NULL,
            PRIMARY KEY (day, tenant, layer, action)
        ) WITHOUT ROWID""",
        """CREATE TABLE stats_sources (
            day    TEXT NOT NULL,
            tenant TEXT NOT NULL,
            source TEXT NOT NULL,
            action TEXT NOT NULL,
            n      INTEGER NOT NULL,
            PRIMARY KEY (day, tenant, source, action)
        ) WITHOUT ROWID""",
        """CREATE TABLE used_tokens (
            nonce      TEXT PRIMARY KEY,
            expires_at INTEGER NOT NULL
        ) WITHOUT ROWID""",
    ):
        conn.execute(statement)


# Entry i takes the schema from version i to i + 1; append, never edit.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    _v1_tenants_domains_users,
    _v2_quarantine_challenges_audit,
    _v3_web_overrides_stats,
)


# --- the database ----------------------------------------------------------------------------

_USER_COLUMNS = (
    "users.id, users.address, tenants.name, users.role, users.disabled, "
    "users.created, users.password_changed"
)
_USER_FROM = "users JOIN tenants ON tenants.id = users.tenant"

UserRow = tuple[int, str, str, str, int, int, int]


def _user(row: UserRow) -> User:
    id_, address, tenant, role, disabled, created, changed = row
    return User(id_, address, tenant, cast(Role, role), bool(disabled), created, changed)


@dataclass(frozen=True, slots=True)
class _DomainMap:
    generation: int
    tenants: dict[str, str]  # folded domain → tenant name, local domains only
    checked: float  # time.monotonic() of the last look at the generation


class Database:
    """The open control-plane database; make one with `Database.open`."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        hasher: PasswordHasher | None = None,
    ) -> None:
        """Use `Database.open`; this neither creates nor migrates the file."""
        self.path = path
        self._clock = clock
        self._hasher = hasher or PasswordHasher()  # argon2id, RFC 9106's low-memory profile
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _connections and _closed only
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        # The domains the config calls local (the last sync_domains); None
        # until then, and the table alone answers.
        self._local_domains: frozenset[str] | None = None
        self._map: _DomainMap | None = None
        self._dummy_hash: str | None = None

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        hasher: PasswordHasher | None = None,
    ) -> Database:
        """Open (creating it 0600, its directory 0700) and migrate the database at ``path``.

        ``clock`` gives the times recorded (Unix seconds); ``hasher`` the
        argon2 parameters of new hashes (a stored hash made with others is
        replaced at its next successful `verify_password`).
        """
        path = Path(path)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # SQLite would create the file by the umask (often 0644); its -wal
            # and -shm files take the mode of the database file.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as e:
            raise DatabaseError(f"{path}: cannot open: {e.strerror or e}") from None
        db = cls(path, clock=clock, hasher=hasher)
        try:
            db._setup()
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        """Close every thread's connection; the database cannot be used after."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Database {self.path}>"

    # --- connections and transactions ---

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and not self._closed:
            return conn
        with self._lock:
            if self._closed:
                raise DatabaseError(f"{self.path}: the database is closed")
            with self._errors():
                conn = sqlite3.connect(
                    self.path,
                    timeout=BUSY_TIMEOUT_S,  # sets busy_timeout
                    isolation_level=None,  # we say BEGIN and COMMIT ourselves
                    # Used by its own thread only; close() may run elsewhere.
                    check_same_thread=False,
                )
                conn.execute("PRAGMA foreign_keys = ON")
                # In WAL mode NORMAL stays consistent through any crash, and
                # survives a process crash whole; a power loss may roll back
                # the last commits before a checkpoint. What is here (users,
                # tenants) is made by hand and can be made again, and the
                # spool, not this file, is the truth about messages, so one
                # fsync per commit is not worth its cost.
                conn.execute("PRAGMA synchronous = NORMAL")
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's errors as ours, naming the file."""
        try:
            yield
        except sqlite3.IntegrityError as e:
            raise ConflictError(f"{self.path}: {e}") from None
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise DatabaseError(
                    f"{self.path}: still locked by another process after "
                    f"{BUSY_TIMEOUT_S:g} s; try again"
                ) from None
            raise DatabaseError(f"{self.path}: {e}") from None
        except sqlite3.ProgrammingError as e:
            if self._closed:
                raise DatabaseError(f"{self.path}: the database is closed") from None
            raise DatabaseError(f"{self.path}: {e}") from None
        except sqlite3.DatabaseError as e:
            raise DatabaseError(f"{self.path}: not a usable kithmail database ({e})") from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding SQLite's write lock from the start.

        IMMEDIATE, so that two writers queue on busy_timeout instead of one
        failing with SQLITE_BUSY when it upgrades a read to a write.
        """
        conn = self._conn()
        with self._errors():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        with self._errors():
            return self._conn().execute(sql, params).fetchall()

    # The modules that own a table of their own (quarantine, sav, audit)
    # keep their SQL beside their logic and reach the file through these
    # two doors, with this module's errors, locking and thread rules.

    def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        """Rows of one read query (any thread; a cheap, indexed read may run on the loop)."""
        return self._read(sql, params)

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE write transaction (call from a worker thread, not the loop)."""
        with self._write() as conn:
            yield conn

    def audit(
        self, actor: str, action: str, *, tenant: str = "", target: str = "", detail: str = ""
    ) -> None:
        """Record who did what in the audit log."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO audit_log (at, actor, tenant, action, target, detail)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (int(self._clock()), actor, tenant, action, target, detail),
            )

    def expire_audit(
        self, older_than: float, *, now: float | None = None, limit: int = 10000
    ) -> int:
        """Delete up to `limit` audit rows more than `older_than` seconds before `now`.

        Oldest first; the number deleted. `limit` bounds one write
        transaction, so a caller that gets `limit` back calls again.
        """
        cutoff = int((self._clock() if now is None else now) - older_than)
        with self._write() as conn:
            return conn.execute(
                "DELETE FROM audit_log WHERE id IN"
                " (SELECT id FROM audit_log WHERE at < ? ORDER BY at LIMIT ?)",
                (cutoff, limit),
            ).rowcount

    def _setup(self) -> None:
        conn = self._conn()
        with self._errors():
            mode = self._journal_mode_wal(conn)
            if mode != "wal":
                raise DatabaseError(
                    f"{self.path}: cannot use WAL mode here (got {mode!r}); "
                    "put [server] data_dir on a local filesystem"
                )
            known = len(MIGRATIONS)
            if self._version(conn) == known:
                return
            with self._write():
                version = self._version(conn)  # again: another process may have migrated
                for migration in MIGRATIONS[version:]:
                    migration(conn)
                # PRAGMA user_version is part of the transaction.
                conn.execute(f"PRAGMA user_version = {max(version, known)}")

    def _journal_mode_wal(self, conn: sqlite3.Connection) -> str:
        """Switch to WAL and read the schema version once; the journal mode in force.

        Processes that open a new database at the same moment (the workers
        of a first start) race to switch it to WAL, which needs the file
        to themselves; SQLite answers the loser SQLITE_BUSY at once, without
        its busy handler, since waiting could deadlock. So the switch is
        tried again until it is made or `BUSY_TIMEOUT_S` has passed.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        pause = 0.005
        while True:
            try:
                mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
                self._version(conn)  # the first read may meet a WAL recovery: BUSY too
                return mode
            except sqlite3.OperationalError as e:
                busy = "locked" in str(e) or "busy" in str(e)
                if not busy or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def _version(self, conn: sqlite3.Connection) -> int:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise SchemaTooNewError(
                f"{self.path} has schema {version}, this kithmail knows up to "
                f"{len(MIGRATIONS)}: upgrade kithmail"
            )
        return version

    @property
    def schema_version(self) -> int:
        return cast(int, self._read("PRAGMA user_version")[0][0])

    # --- tenants and domains ---

    def _tenant_id(self, conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute("SELECT id FROM tenants WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no tenant named {name!r}")
        return int(row[0])

    def _ensure_tenant(self, conn: sqlite3.Connection, name: str) -> int:
        conn.execute(
            "INSERT OR IGNORE INTO tenants (name, created) VALUES (?, ?)", (name, self._now())
        )
        return self._tenant_id(conn, name)

    def add_tenant(self, name: str) -> Tenant:
        """A new tenant with no domains; ConflictError when the name is taken."""
        folded = fold_tenant(name)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM tenants WHERE name = ?", (folded,)).fetchone():
                raise ConflictError(f"tenant {folded!r} exists already")
            conn.execute("INSERT INTO tenants (name, created) VALUES (?, ?)", (folded, self._now()))
        return self.tenant(folded)

    def tenant(self, name: str) -> Tenant:
        """One tenant; NotFoundError when there is none of that name."""
        folded = fold_tenant(name)
        for t in self.tenants():
            if t.name == folded:
                return t
        raise NotFoundError(f"no tenant named {folded!r}")

    def tenants(self) -> list[Tenant]:
        """Every tenant by name, with its domains (local or not) and user count."""
        rows = self._read(
            "SELECT t.id, t.name, t.created,"
            " (SELECT group_concat(domain, ' ') FROM"
            "   (SELECT domain FROM domains WHERE tenant = t.id ORDER BY domain)),"
            " (SELECT count(*) FROM users WHERE tenant = t.id)"
            " FROM tenants AS t ORDER BY t.name"
        )
        return [
            Tenant(
                id=cast(int, id_),
                name=cast(str, name),
                created=cast(int, created),
                domains=tuple(cast(str, domains).split()) if domains else (),
                users=cast(int, users),
            )
            for id_, name, created, domains, users in rows
        ]

    def sync_domains(self, local: Sequence[str], default_tenant: str = DEFAULT_TENANT) -> None:
        """Make the config's local domains known: each one not yet mapped joins ``default_tenant``.

        The config says which domains are local; the table only says whose
        they are. A domain dropped from the config keeps its row (and its
        users their accounts, should it come back) but `tenant_of` stops
        answering for it, in this process, from this call on. The default
        tenant is created only when a domain needs it.
        """
        folded = frozenset(fold_domain(d) for d in local)
        tenant = fold_tenant(default_tenant)
        # Every worker and every `kith` run syncs at start; most find nothing
        # to do, and then take no write lock.
        if folded - {cast(str, r[0]) for r in self._read("SELECT domain FROM domains")}:
            with self._write() as conn:
                have = {r[0] for r in conn.execute("SELECT domain FROM domains")}
                missing = sorted(folded - have)
                if missing:
                    tenant_id = self._ensure_tenant(conn, tenant)
                    conn.executemany(
                        "INSERT INTO domains (domain, tenant) VALUES (?, ?)",
                        [(d, tenant_id) for d in missing],
                    )
        self._local_domains = folded
        self._map = None

    def set_domain_tenant(self, domain: str, tenant: str) -> None:
        """Give a local domain (and its users) to ``tenant``.

        InvalidError when the domain is not local (not in ``[domains]
        local``, as last given to `sync_domains`); NotFoundError when the
        tenant does not exist.
        """
        folded = fold_domain(domain)
        name = fold_tenant(tenant)
        if self._local_domains is not None and folded not in self._local_domains:
            raise InvalidError(f"{folded} is not a local domain (add it to [domains] local)")
        with self._write() as conn:
            tenant_id = self._tenant_id(conn, name)
            conn.execute(
                "INSERT INTO domains (domain, tenant) VALUES (?, ?)"
                " ON CONFLICT (domain) DO UPDATE SET tenant = excluded.tenant"
                " WHERE tenant != excluded.tenant",
                (folded, tenant_id),
            )
        self._map = None

    def tenant_of(self, domain: str) -> str | None:
        """The tenant of a local domain; None when the domain is not local (or not a domain).

        On the SMTP hot path: a dict lookup, and at most once a second one
        indexed read to learn whether another process changed the map.
        """
        tenants = self._domain_map()
        found = tenants.get(domain)
        if found is not None:
            return found
        try:
            return tenants.get(fold_domain(domain))
        except InvalidError:
            return None

    def _domain_map(self) -> dict[str, str]:
        now = time.monotonic()
        current = self._map
        if current is not None and now - current.checked < DOMAIN_REFRESH_S:
            return current.tenants
        with self._errors():
            conn = self._conn()
            generation = int(
                conn.execute("SELECT n FROM generations WHERE name = 'domains'").fetchone()[0]
            )
            if current is not None and current.generation == generation:
                tenants = current.tenants
            else:
                # One read transaction, so the generation matches the rows.
                conn.execute("BEGIN")
                try:
                    generation = int(
                        conn.execute("SELECT n FROM generations WHERE name = 'domains'").fetchone()[
                            0
                        ]
                    )
                    rows = conn.execute(
                        "SELECT domains.domain, tenants.name FROM domains"
                        " JOIN tenants ON tenants.id = domains.tenant"
                    ).fetchall()
                finally:
                    conn.execute("COMMIT")
                local = self._local_domains
                tenants = {d: t for d, t in rows if local is None or d in local}
        # Threads may race to store a map here; each stores a whole, correct one.
        self._map = _DomainMap(generation, tenants, now)
        return tenants

    # --- users ---

    def add_user(
        self, address: str, *, password: str | None = None, role: str = "user"
    ) -> tuple[User, str]:
        """A new user of the tenant of its domain; returns it and its password.

        A password of None is generated (`generate_password`) and returned,
        to be shown once. InvalidError for a bad address, password or role,
        or a domain that is not local; ConflictError when the user exists.
        """
        folded = fold_address(address)
        checked_role = _check_role(role)
        if password is None:
            password = generate_password()
        _check_password(password)
        local = folded.rpartition("@")[0]
        if local in RESERVED_LOCAL_PARTS:
            raise InvalidError(f"{folded}: the local part {local!r} is reserved for kithmail")
        password_hash = self._hasher.hash(password)  # ~0.1 s: before taking the write lock
        with self._write() as conn:
            self._insert_user(conn, folded, password_hash, checked_role)
        user = self.find_user(folded)
        assert user is not None
        return user, password

    def _insert_user(
        self, conn: sqlite3.Connection, folded: str, password_hash: str, role: Role
    ) -> None:
        domain = folded.rpartition("@")[2]
        row = conn.execute("SELECT tenant FROM domains WHERE domain = ?", (domain,)).fetchone()
        local = self._local_domains
        if row is None or (local is not None and domain not in local):
            raise InvalidError(
                f"{folded}: {domain} is not a local domain (add it to [domains] local)"
            )
        if conn.execute("SELECT 1 FROM users WHERE address = ?", (folded,)).fetchone():
            raise ConflictError(f"user {folded} exists already")
        now = self._now()
        conn.execute(
            "INSERT INTO users (address, domain, tenant, password_hash, role, created,"
            " password_changed) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (folded, domain, row[0], password_hash, role, now, now),
        )

    def find_user(self, address: str) -> User | None:
        """The user mail for ``address`` goes to, disabled or not; None when there is none.

        The exact (folded) address first, else the address without its
        ``+tag``: ``ann+news@example.test`` finds ``ann@example.test``
        unless ``ann+news`` is a user of its own. On the SMTP hot path: one
        indexed query, no argon2. Anything that is not a plain address
        (see `fold_address`) finds no one.
        """
        try:
            folded = fold_address(address)
        except InvalidError:
            return None
        untagged = _untagged(folded) or folded
        with self._errors():
            row = (
                self._conn()
                .execute(
                    f"SELECT {_USER_COLUMNS} FROM {_USER_FROM}"
                    " WHERE users.address IN (?, ?) ORDER BY users.address = ? DESC LIMIT 1",
                    (folded, untagged, folded),
                )
                .fetchone()
            )
        return None if row is None else _user(row)

    def user(self, address: str) -> User:
        """The user of exactly this address (no ``+tag`` stripping); NotFoundError if none."""
        folded = fold_address(address)
        rows = self._read(f"SELECT {_USER_COLUMNS} FROM {_USER_FROM} WHERE address = ?", (folded,))
        if not rows:
            raise NotFoundError(f"no user {folded}")
        return _user(cast(UserRow, rows[0]))

    def users(self, tenant: str | None = None) -> list[User]:
        """Every user by address, or those of one tenant (NotFoundError if it does not exist)."""
        if tenant is None:
            rows = self._read(f"SELECT {_USER_COLUMNS} FROM {_USER_FROM} ORDER BY users.address")
        else:
            name = fold_tenant(tenant)
            with self._errors():
                conn = self._conn()
                conn.execute("BEGIN")
                try:
                    tenant_id = self._tenant_id(conn, name)
                    rows = conn.execute(
                        f"SELECT {_USER_COLUMNS} FROM {_USER_FROM}"
                        " WHERE users.tenant = ? ORDER BY users.address",
                        (tenant_id,),
                    ).fetchall()
                finally:
                    conn.execute("COMMIT")
        return [_user(cast(UserRow, r)) for r in rows]

    def remove_user(self, address: str) -> None:
        """Delete a user; NotFoundError when there is none."""
        folded = fold_address(address)
        with self._write() as conn:
            if conn.execute("DELETE FROM users WHERE address = ?", (folded,)).rowcount == 0:
                raise NotFoundError(f"no user {folded}")

    def set_password(self, address: str, password: str) -> User:
        """Replace a user's password (and record when); NotFoundError when there is none."""
        folded = fold_address(address)
        _check_password(password)
        password_hash = self._hasher.hash(password)
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE users SET password_hash = ?, password_changed = ? WHERE address = ?",
                (password_hash, self._now(), folded),
            ).rowcount
            if changed == 0:
                raise NotFoundError(f"no user {folded}")
        return self.user(folded)

    def set_disabled(self, address: str, disabled: bool) -> User:
        """Disable (or enable again) a user; a disabled user never logs in."""
        folded = fold_address(address)
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE users SET disabled = ? WHERE address = ?", (int(disabled), folded)
            ).rowcount
            if changed == 0:
                raise NotFoundError(f"no user {folded}")
        return self.user(folded)

    def verify_password(self, address: str, password: str) -> User | None:
        """The user when ``password`` is theirs and they are enabled; else None.

        Takes as long for an unknown or disabled user as for a wrong
        password (one argon2 verification each), so the answer's timing
        tells nothing. A hash made with other argon2 parameters than this
        database's is replaced on success. The exact address logs in, never
        a ``+tag`` form of it. Argon2 takes about 0.1 s of CPU: call this
        from a thread (``asyncio.to_thread``), never on the event loop.
        """
        try:
            folded = fold_address(address)
        except InvalidError:
            return None
        rows = self._read(
            f"SELECT {_USER_COLUMNS}, users.password_hash FROM {_USER_FROM}"
            " WHERE users.address = ?",
            (folded,),
        )
        if not rows:
            self._verify(self._dummy(), password)
            return None
        *user_row, stored = rows[0]
        user = _user(cast(UserRow, tuple(user_row)))
        stored_hash = cast(str, stored)
        if not self._verify(stored_hash, password) or user.disabled:
            return None
        if self._needs_rehash(stored_hash):
            new_hash = self._hasher.hash(password)
            with self._write() as conn:
                # Only if unchanged meanwhile: never undo a concurrent password change.
                conn.execute(
                    "UPDATE users SET password_hash = ? WHERE id = ? AND password_hash = ?",
                    (new_hash, user.id, stored_hash),
                )
        return user

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def _needs_rehash(self, password_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(generate_password())
        return self._dummy_hash

    def ensure_admin(self, domain: str) -> str | None:
        """Make ``admin@<domain>`` a global admin when there is none; return its password.

        None when a global admin exists (enabled or not: the shell can
        always enable one). Safe when several processes start at once: the
        check and the insert are one write transaction, so exactly one of
        them creates the admin. ConflictError when ``admin@<domain>`` is an
        existing user who is not a global admin: making them one is for an
        operator to decide.
        """
        if self._has_global_admin():
            return None
        address = fold_address(f"admin@{domain}")
        password = generate_password()
        password_hash = self._hasher.hash(password)
        with self._write() as conn:
            if self._has_global_admin(conn):
                return None
            if conn.execute("SELECT 1 FROM users WHERE address = ?", (address,)).fetchone():
                raise ConflictError(
                    f"there is no global admin, and {address} exists but is not one: make one "
                    f"with `kith user add ADDRESS --role global_admin`"
                )
            self._insert_user(conn, address, password_hash, "global_admin")
        return password

    def _has_global_admin(self, conn: sqlite3.Connection | None = None) -> bool:
        with self._errors():
            c = conn or self._conn()
            return (
                c.execute("SELECT 1 FROM users WHERE role = 'global_admin' LIMIT 1").fetchone()
                is not None
            )

    def _now(self) -> int:
        return int(self._clock())

    def set_role(self, address: str, role: str) -> User:
        """Make a user a plain user, a tenant admin or a global admin; NotFoundError if none.

        InvalidError for an unknown role, and for taking the role of the
        last enabled global admin away (nobody could then run the gateway
        from the web; the shell still could, with ``kith user add``).
        """
        folded = fold_address(address)
        checked = _check_role(role)
        with self._write() as conn:
            row = conn.execute(
                "SELECT role, disabled FROM users WHERE address = ?", (folded,)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no user {folded}")
            if row[0] == "global_admin" and checked != "global_admin" and not row[1]:
                others = conn.execute(
                    "SELECT count(*) FROM users WHERE role = 'global_admin' AND disabled = 0"
                    " AND address != ?",
                    (folded,),
                ).fetchone()[0]
                if others == 0:
                    raise InvalidError(f"{folded} is the last enabled global admin")
            conn.execute("UPDATE users SET role = ? WHERE address = ?", (checked, folded))
        return self.user(folded)
