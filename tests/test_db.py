"""The control-plane database (kithmail.db): real SQLite files, real processes.

Every database lives in the test's tmp_path. Several processes open one
file, as the server's workers and the ``kith`` command do; changes made by
another process are waited for by polling with a deadline, never by a
fixed sleep.
"""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from conftest import RunPython

from kithmail import db
from kithmail.db import (
    ConflictError,
    Database,
    DatabaseError,
    InvalidError,
    NotFoundError,
    SchemaTooNewError,
)

# Cheap argon2 parameters for the tests' own hashing; the code's defaults are
# exercised by the processes the tests start.
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
LOCAL = ["example.test", "Bücher.TEST", "other.test"]

OpenDb = Callable[..., Database]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "kithmail.db"


@pytest.fixture
def open_db(db_path: Path) -> Iterator[OpenDb]:
    """Open databases (closed at the end); by default at db_path, fast hashes."""
    opened: list[Database] = []

    def _open(path: Path | None = None, **kw: object) -> Database:
        kw.setdefault("hasher", FAST)
        d = Database.open(path or db_path, **kw)  # type: ignore[arg-type]
        opened.append(d)
        return d

    yield _open
    for d in opened:
        d.close()


@pytest.fixture
def database(open_db: OpenDb) -> Database:
    d = open_db()
    d.sync_domains(LOCAL)
    return d


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# --- opening and the schema ------------------------------------------------------------------


def test_open_creates_private_file_in_wal_mode(db_path: Path, open_db: OpenDb) -> None:
    open_db()
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == len(db.MIGRATIONS)
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"tenants", "domains", "users"} <= tables
    for side in ("-wal", "-shm"):
        side_file = db_path.with_name(db_path.name + side)
        if side_file.exists():
            assert stat.S_IMODE(side_file.stat().st_mode) == 0o600


def test_reopen_keeps_data_and_schema(db_path: Path, open_db: OpenDb) -> None:
    first = open_db()
    first.sync_domains(LOCAL)
    first.add_user("ann@example.test", password="correct horse")
    first.close()
    again = open_db()
    assert again.schema_version == len(db.MIGRATIONS)
    assert again.verify_password("ann@example.test", "correct horse") is not None


def test_schema_too_new_is_refused(db_path: Path, open_db: OpenDb) -> None:
    open_db().close()
    with sqlite3.connect(db_path) as raw:
        raw.execute("PRAGMA user_version = 7")
    with pytest.raises(SchemaTooNewError) as e:
        open_db()
    assert str(e.value) == (
        f"{db_path} has schema 7, this kithmail knows up to {len(db.MIGRATIONS)}: upgrade kithmail"
    )
    assert "kithmail.db has schema 7" in str(e.value)


def test_not_a_database_is_a_clear_error(db_path: Path, open_db: OpenDb) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not sqlite\n" * 100)
    with pytest.raises(DatabaseError, match="not a usable kithmail database"):
        open_db()


def test_closed_database_refuses_use(open_db: OpenDb) -> None:
    d = open_db()
    d.close()
    with pytest.raises(DatabaseError, match="closed"):
        d.find_user("ann@example.test")


# --- domains and tenants ---------------------------------------------------------------------


def test_sync_domains_maps_local_domains_to_default_tenant(database: Database) -> None:
    assert database.tenant_of("example.test") == "default"
    assert database.tenant_of("EXAMPLE.Test") == "default"
    assert database.tenant_of("bücher.test") == "default"
    assert database.tenant_of("xn--bcher-kva.test") == "default"
    assert database.tenant_of("elsewhere.test") is None
    assert database.tenant_of("[192.0.2.1]") is None
    assert database.tenant_of("") is None
    [tenant] = database.tenants()
    assert tenant.name == "default"
    assert tenant.domains == ("example.test", "other.test", "xn--bcher-kva.test")
    assert tenant.users == 0


def test_sync_keeps_assignments_and_drops_domains_from_answers(
    open_db: OpenDb, database: Database
) -> None:
    database.add_tenant("acme")
    database.set_domain_tenant("other.test", "acme")
    database.add_user("bob@other.test", password="correct horse")
    # The config no longer lists other.test: its row stays, tenant_of stops answering.
    database.sync_domains(["example.test"])
    assert database.tenant_of("other.test") is None
    assert database.tenant_of("example.test") == "default"
    assert database.find_user("bob@other.test") is not None
    # Back in the config: still acme's, not the default tenant's.
    database.sync_domains(["example.test", "other.test"])
    assert database.tenant_of("other.test") == "acme"
    # A second process syncing the same list leaves everything as it is.
    other = open_db()
    other.sync_domains(["example.test", "other.test"], default_tenant="fresh")
    assert [t.name for t in other.tenants()] == ["acme", "default"]


def test_default_tenant_is_made_only_when_needed(open_db: OpenDb) -> None:
    d = open_db()
    d.sync_domains([])
    assert d.tenants() == []
    d.sync_domains(["example.test"], default_tenant="Main")
    assert [(t.name, t.domains) for t in d.tenants()] == [("main", ("example.test",))]


def test_tenants_are_unique_and_named_plainly(database: Database) -> None:
    acme = database.add_tenant("Acme")
    assert (acme.name, acme.domains, acme.users) == ("acme", (), 0)
    with pytest.raises(ConflictError, match="tenant 'acme' exists"):
        database.add_tenant("ACME")
    for bad in ("", "a b", "-x", "x" * 65, "a/b"):
        with pytest.raises(InvalidError, match="invalid tenant name"):
            database.add_tenant(bad)


def test_set_domain_tenant_moves_domain_and_its_users(database: Database) -> None:
    database.add_user("ann@example.test", password="correct horse")
    database.add_user("bob@other.test", password="correct horse")
    database.add_tenant("acme")
    database.set_domain_tenant("Example.TEST", "acme")
    assert database.tenant_of("example.test") == "acme"
    assert database.tenant_of("other.test") == "default"
    ann = database.find_user("ann@example.test")
    assert ann is not None and ann.tenant == "acme"
    assert [u.address for u in database.users("acme")] == ["ann@example.test"]
    assert [u.address for u in database.users("default")] == ["bob@other.test"]
    counts = {t.name: (t.domains, t.users) for t in database.tenants()}
    assert counts == {
        "acme": (("example.test",), 1),
        "default": (("other.test", "xn--bcher-kva.test"), 1),
    }


def test_set_domain_tenant_refuses_unknowns(database: Database) -> None:
    with pytest.raises(NotFoundError, match="no tenant named 'nope'"):
        database.set_domain_tenant("example.test", "nope")
    database.add_tenant("acme")
    with pytest.raises(InvalidError, match=r"elsewhere\.test is not a local domain"):
        database.set_domain_tenant("elsewhere.test", "acme")
    assert database.tenant_of("elsewhere.test") is None


def test_tenant_of_sees_another_process_change_within_seconds(
    database: Database, db_path: Path, run_python: RunPython
) -> None:
    assert database.tenant_of("example.test") == "default"
    r = run_python(
        "import sys\n"
        "from pathlib import Path\n"
        "from kithmail.db import Database\n"
        "d = Database.open(Path(sys.argv[1]))\n"
        "d.sync_domains(['example.test'])\n"
        "d.add_tenant('acme')\n"
        "d.set_domain_tenant('example.test', 'acme')\n"
        "d.close()\n",
        str(db_path),
    )
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: database.tenant_of("example.test") == "acme", timeout=5)
    assert database.tenant_of("other.test") == "default"


# --- addresses and users ---------------------------------------------------------------------


def test_add_user_folds_as_the_core_does(database: Database) -> None:
    user, password = database.add_user("Ann@Example.TEST")
    assert user.address == "ann@example.test"
    assert (user.tenant, user.role, user.disabled) == ("default", "user", False)
    assert len(password) >= 20
    assert database.find_user("ann@example.test") == user
    assert database.find_user("ANN@EXAMPLE.TEST") == user
    with pytest.raises(ConflictError, match=r"user ann@example\.test exists"):
        database.add_user("ann@example.test")
    idn, _ = database.add_user("Jürgen@Bücher.test", password="correct horse")
    assert idn.address == "jürgen@xn--bcher-kva.test"
    assert database.find_user("jürgen@bücher.test") == idn


def test_generated_passwords_differ_and_verify(database: Database) -> None:
    _, first = database.add_user("ann@example.test")
    _, second = database.add_user("bob@example.test")
    assert first != second
    assert database.verify_password("ann@example.test", first) is not None
    assert database.verify_password("bob@example.test", first) is None


def test_find_user_strips_a_plus_tag(database: Database) -> None:
    ann, _ = database.add_user("ann@example.test", password="correct horse")
    assert database.find_user("ann+news@example.test") == ann
    assert database.find_user("Ann+News+More@Example.test") == ann
    assert database.find_user("ann+@example.test") == ann
    # A user of its own for a tagged address wins over the untagged one.
    own, _ = database.add_user("ann+list@example.test", password="correct horse")
    assert database.find_user("ann+list@example.test") == own
    assert database.find_user("ann+other@example.test") == ann
    # No local part before the "+": nothing to strip to.
    assert database.find_user("+ann@example.test") is None
    assert database.find_user("bob+x@example.test") is None
    assert database.find_user("ann@other.test") is None


RELAY_TRICKS = [
    '"ann"@example.test',  # quoted local part
    '"ann@elsewhere.test"@example.test',
    "ann%elsewhere.test@example.test",  # % hack
    "elsewhere.test!ann@example.test",  # ! path
    "ann@elsewhere.test@example.test",  # @ in the local part
    "@relay.test:ann@example.test",  # source route
    "@a.test,@b.test:ann@example.test",
    "ann@[192.0.2.1]",  # address literals
    "ann@[IPv6:2001:db8::1]",
    "ann@example.test.",  # trailing dot
    "ann.@example.test",
    ".ann@example.test",
    "an..n@example.test",
    "ann @example.test",
    "ann\r\n@example.test",
    "ann\x00@example.test",
    "an(comment)n@example.test",
    "<ann@example.test>",
    "ann",
    "@example.test",
    "ann@",
    "a" * 65 + "@example.test",  # local part > 64 octets
    "é" * 33 + "@example.test",  # 66 octets in UTF-8
    "ann@" + ".".join(["a" * 63] * 4) + ".test",  # domain > 255 octets
]


@pytest.mark.parametrize("address", RELAY_TRICKS)
def test_add_user_refuses_anything_but_a_plain_address(database: Database, address: str) -> None:
    with pytest.raises(InvalidError) as e:
        database.add_user(address, password="correct horse")
    assert "invalid address" in str(e.value)
    assert database.find_user(address) is None
    assert database.users() == []


def test_add_user_accepts_the_longest_plain_address(database: Database) -> None:
    local = "a" * 64
    user, _ = database.add_user(f"{local}@example.test", password="correct horse")
    assert user.address == f"{local}@example.test"
    odd, _ = database.add_user("o'brien.j_x-y=z/w@example.test", password="correct horse")
    assert database.find_user("O'Brien.J_X-Y=Z/W@example.test") == odd


def test_add_user_needs_a_local_domain(database: Database) -> None:
    with pytest.raises(InvalidError, match=r"elsewhere\.test is not a local domain"):
        database.add_user("ann@elsewhere.test")
    database.sync_domains(["example.test"])  # other.test is no longer local
    with pytest.raises(InvalidError, match=r"other\.test is not a local domain"):
        database.add_user("ann@other.test")


def test_add_user_checks_role_password_and_reserved_names(database: Database) -> None:
    with pytest.raises(InvalidError, match="invalid role 'root'"):
        database.add_user("ann@example.test", role="root")
    with pytest.raises(InvalidError, match="8 to 1024 characters"):
        database.add_user("ann@example.test", password="short")
    with pytest.raises(InvalidError, match="reserved"):
        database.add_user("SAV@example.test", password="correct horse")
    assert database.users() == []
    admin, _ = database.add_user("boss@example.test", role="tenant_admin")
    assert admin.role == "tenant_admin"


def test_users_lists_by_tenant(database: Database) -> None:
    database.add_tenant("acme")
    database.set_domain_tenant("other.test", "acme")
    for a in ("zed@example.test", "ann@example.test", "bob@other.test"):
        database.add_user(a, password="correct horse")
    assert [u.address for u in database.users()] == [
        "ann@example.test",
        "bob@other.test",
        "zed@example.test",
    ]
    assert [u.address for u in database.users("ACME")] == ["bob@other.test"]
    with pytest.raises(NotFoundError, match="no tenant named 'nope'"):
        database.users("nope")


def test_remove_user(database: Database) -> None:
    database.add_user("ann@example.test", password="correct horse")
    database.remove_user("Ann@Example.test")
    assert database.find_user("ann@example.test") is None
    assert database.verify_password("ann@example.test", "correct horse") is None
    with pytest.raises(NotFoundError, match=r"no user ann@example\.test"):
        database.remove_user("ann@example.test")


# --- passwords -------------------------------------------------------------------------------


def test_verify_password(database: Database) -> None:
    database.add_user("ann@example.test", password="correct horse")
    user = database.verify_password("ANN@example.test", "correct horse")
    assert user is not None and user.address == "ann@example.test"
    assert database.verify_password("ann@example.test", "Correct horse") is None
    assert database.verify_password("ann@example.test", "") is None
    assert database.verify_password("nobody@example.test", "correct horse") is None
    assert database.verify_password("not an address", "correct horse") is None
    # A +tag form routes mail, it does not log in.
    assert database.verify_password("ann+x@example.test", "correct horse") is None


def test_disabled_user_never_verifies(database: Database) -> None:
    database.add_user("ann@example.test", password="correct horse")
    user = database.set_disabled("ann@example.test", True)
    assert user.disabled
    assert database.verify_password("ann@example.test", "correct horse") is None
    found = database.find_user("ann@example.test")  # mail routing still finds them
    assert found is not None and found.disabled
    assert not database.set_disabled("ann@example.test", False).disabled
    assert database.verify_password("ann@example.test", "correct horse") is not None
    with pytest.raises(NotFoundError):
        database.set_disabled("nobody@example.test", True)


def test_set_password(open_db: OpenDb, database: Database) -> None:
    clock = [1_000_000.0]
    timed = open_db(clock=lambda: clock[0])
    timed.sync_domains(LOCAL)
    user, _ = timed.add_user("ann@example.test", password="correct horse")
    assert user.created == user.password_changed == 1_000_000
    clock[0] += 3600
    changed = timed.set_password("ann@example.test", "battery staple")
    assert (changed.created, changed.password_changed) == (1_000_000, 1_003_600)
    assert database.verify_password("ann@example.test", "correct horse") is None
    assert database.verify_password("ann@example.test", "battery staple") is not None
    with pytest.raises(InvalidError):
        timed.set_password("ann@example.test", "short")
    with pytest.raises(NotFoundError, match=r"no user bob@example\.test"):
        timed.set_password("bob@example.test", "battery staple")


def test_hash_is_argon2id_and_renewed_when_parameters_change(
    db_path: Path, open_db: OpenDb, database: Database
) -> None:
    database.add_user("ann@example.test", password="correct horse")

    def stored() -> str:
        with sqlite3.connect(db_path) as raw:
            return str(
                raw.execute(
                    "SELECT password_hash FROM users WHERE address = 'ann@example.test'"
                ).fetchone()[0]
            )

    old = stored()
    assert old.startswith("$argon2id$") and "m=1024,t=1,p=1" in old
    assert "correct horse" not in old
    stronger = open_db(hasher=PasswordHasher(time_cost=2, memory_cost=2048, parallelism=1))
    assert stronger.verify_password("ann@example.test", "wrong horse") is None
    assert stored() == old  # a failed login changes nothing
    assert stronger.verify_password("ann@example.test", "correct horse") is not None
    new = stored()
    assert new != old and "m=2048,t=2,p=1" in new
    assert database.verify_password("ann@example.test", "correct horse") is not None


# --- the first admin -------------------------------------------------------------------------


def test_ensure_admin_once(database: Database) -> None:
    password = database.ensure_admin("Example.test")
    assert password is not None
    admin = database.verify_password("admin@example.test", password)
    assert admin is not None and admin.role == "global_admin"
    assert database.ensure_admin("example.test") is None
    assert database.ensure_admin("other.test") is None
    # Any global admin counts, disabled or not: the shell can enable one.
    database.set_disabled("admin@example.test", True)
    assert database.ensure_admin("example.test") is None


def test_ensure_admin_never_promotes_an_existing_user(database: Database) -> None:
    database.add_user("admin@example.test", password="correct horse")
    with pytest.raises(ConflictError, match="exists but is not one"):
        database.ensure_admin("example.test")
    user = database.find_user("admin@example.test")
    assert user is not None and user.role == "user"


def test_ensure_admin_needs_a_local_domain(database: Database) -> None:
    with pytest.raises(InvalidError, match="not a local domain"):
        database.ensure_admin("elsewhere.test")


ENSURE_ADMIN = """
import sys, time
from pathlib import Path
from kithmail.db import Database
path, go = Path(sys.argv[1]), Path(sys.argv[2])
d = Database.open(path)
d.sync_domains(["example.test"])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
password = d.ensure_admin("example.test")
print("created" if password else "exists", password or "", flush=True)
d.close()
"""


def test_ensure_admin_in_processes_starting_at_once(tmp_path: Path, db_path: Path) -> None:
    import subprocess
    import sys

    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ENSURE_ADMIN, str(db_path), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline() == "ready\n"
        go.touch()
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in results]
    outcomes = [out.split() for out, _ in results]
    created = [o for o in outcomes if o[0] == "created"]
    assert len(created) == 1, outcomes
    assert sorted(o[0] for o in outcomes) == ["created", "exists", "exists", "exists"]
    with Database.open(db_path) as d:
        admins = [u for u in d.users() if u.role == "global_admin"]
        assert [u.address for u in admins] == ["admin@example.test"]
        assert d.verify_password("admin@example.test", created[0][1]) is not None


OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
from kithmail.db import Database
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.0005)
with Database.open(Path(sys.argv[1])) as d:
    d.sync_domains(["example.test"])
"""


def test_workers_opening_a_new_database_at_the_same_moment_all_start(tmp_path: Path) -> None:
    """A first start with several workers: each opens the new database at once.

    Only one of them can switch it to WAL; SQLite tells the others "busy"
    at once (no busy handler runs), and before they tried again a worker
    could fail to start with "still locked" although nobody held a lock
    for long. Several rounds of six, since a round may not collide.
    """
    import subprocess
    import sys

    for round_ in range(16):
        where = tmp_path / str(round_)
        where.mkdir()
        go = where / "go"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPEN_AT_ONCE, str(where / "kithmail.db"), str(go)],
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        try:
            time.sleep(0.3)  # let them all reach the barrier (not a result: a head start)
            go.touch()
            errors = [p.communicate(timeout=60)[1] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        assert [p.returncode for p in procs] == [0] * 6, [e for e in errors if e]
        with Database.open(where / "kithmail.db") as d:
            assert d.schema_version == len(db.MIGRATIONS)


# --- threads ---------------------------------------------------------------------------------


def test_writes_from_threads_while_the_loop_reads(database: Database) -> None:
    async def main() -> list[str]:
        names = [f"user{i}@example.test" for i in range(16)]
        writes = asyncio.gather(
            *(asyncio.to_thread(database.add_user, n, password="correct horse") for n in names)
        )
        reads = 0
        while not writes.done():
            # The event loop's thread reads while the writers work.
            assert database.tenant_of("example.test") == "default"
            database.find_user("user0@example.test")
            reads += 1
            await asyncio.sleep(0)
        await writes
        assert reads > 0
        return names

    names = asyncio.run(main())
    assert [u.address for u in database.users()] == sorted(names)
