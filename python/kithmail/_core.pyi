"""Type stubs for kithmail._core, the Rust extension that holds the hot tables.

Written by hand and checked against the built module with
``python -m mypy.stubtest kithmail._core`` (``make test`` does it).

Times are whole seconds since the Unix epoch, always passed in by the caller
(``now``) so tests can move the clock. Addresses are ``str`` ("192.0.2.1",
"2001:db8::1", "::ffff:192.0.2.1" is the IPv4 address) or packed ``bytes``
(4 or 16 octets).
"""

import builtins
from collections.abc import Iterable, Sequence
from typing import Final, Literal, final

__version__: Final[str]
__all__ = [
    "Community",
    "CommunityEntry",
    "ConfigMismatchError",
    "Core",
    "CoreError",
    "InvalidInputError",
    "MapFullError",
    "Membership",
    "Recon",
    "ReconEntry",
    "ReconResult",
    "RepList",
    "RepMatch",
    "Reputation",
    "StorageError",
    "SweepResult",
    "__version__",
    "normalize_address",
    "normalize_entry",
]

_ReconStatus = Literal["new", "too_early", "passed", "known", "exempt"]
_Kind = Literal["allow", "block"]
_Source = Literal["outbound", "sav", "manual", "import", "admin", "journal"]
_MemberStatus = Literal["allowed", "blocked", "unknown"]
_IpLike = str | bytes

class CoreError(Exception):
    """Base of every error the core raises."""

class InvalidInputError(CoreError, ValueError):
    """A malformed IP, CIDR, address, user or name; the message names it."""

class MapFullError(CoreError):
    """The LMDB map is full; the message names the setting to raise."""

class ConfigMismatchError(CoreError):
    """The environment was created with other prefix lengths than asked."""

class StorageError(CoreError):
    """Any other LMDB or I/O failure, with the LMDB cause in the message."""

@final
class ReconResult:
    """What ``Recon.check`` saw.

    ``first_seen`` is when the current attempt cycle began (0 for exempt);
    on ``passed`` the delay Recon imposed is ``now - first_seen``.
    ``recorded`` is False when a new source was not remembered (the
    per-/48 cap, or a full map), so its retry will be deferred again.
    ``lapsed`` is True on a ``new`` answer for a source that was deferred
    before and never retried within the retry window (self-learned
    reputation counts these).
    """

    @property
    def status(self) -> _ReconStatus: ...
    @property
    def first_seen(self) -> int: ...
    @property
    def pass_until(self) -> int: ...
    @property
    def recorded(self) -> bool: ...
    @property
    def lapsed(self) -> bool: ...

@final
class ReconEntry:
    """A stored Recon row, as ``kith recon show`` prints it."""

    @property
    def network(self) -> str: ...
    @property
    def first_seen(self) -> int: ...
    @property
    def last_seen(self) -> int: ...
    @property
    def pass_until(self) -> int: ...
    @property
    def attempts(self) -> int: ...
    @property
    def passes(self) -> int: ...

@final
class SweepResult:
    @property
    def scanned(self) -> int: ...
    @property
    def removed(self) -> int: ...
    @property
    def wrapped(self) -> bool: ...

@final
class Recon:
    """Layer 1's table: greylisting by masked source address."""

    def check(self, ip: _IpLike, now: int) -> ReconResult: ...
    def check_many(self, ips: Sequence[_IpLike], now: int) -> list[ReconResult]: ...
    def peek(self, ip: _IpLike, now: int) -> ReconResult:
        """What ``check`` would answer at ``now``, recording nothing."""
    def show(self, ip: _IpLike) -> ReconEntry | None: ...
    def exempt_add(self, cidr: str) -> bool: ...
    def exempt_remove(self, cidr: str) -> bool: ...
    def exempt_list(self) -> list[str]: ...
    def pending_add(self, sender_domain: str, recipient: str, now: int) -> None: ...
    def pending_get(self, sender_domain: str, recipient: str, now: int) -> int | None: ...
    def sweep(self, now: int, limit: int = 10000) -> SweepResult: ...
    def configure(
        self,
        *,
        min_delay: int | None = None,
        retry_window: int | None = None,
        pass_ttl: int | None = None,
    ) -> None: ...
    def __len__(self) -> int: ...

@final
class RepMatch:
    """The list entry that decided a reputation lookup."""

    @property
    def kind(self) -> _Kind: ...
    @property
    def list(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def score(self) -> int: ...
    @property
    def prefix(self) -> str: ...

@final
class RepList:
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> _Kind: ...
    @property
    def action(self) -> str: ...
    @property
    def score(self) -> int: ...
    @property
    def prefixes(self) -> int: ...
    @property
    def intervals(self) -> int: ...
    @property
    def loaded_at(self) -> int: ...

@final
class Reputation:
    """Layer 2's table: allow/block prefix lists and event counters."""

    def load(
        self,
        name: str,
        kind: _Kind,
        entries: Iterable[str],
        *,
        action: str = "reject",
        score: int = 0,
        now: int = 0,
    ) -> int: ...
    def load_file(
        self,
        name: str,
        kind: _Kind,
        path: str,
        *,
        action: str = "reject",
        score: int = 0,
        now: int = 0,
    ) -> int: ...
    def drop(self, name: str) -> bool: ...
    def lists(self) -> list[RepList]: ...
    def lookup(self, ip: _IpLike) -> RepMatch | None: ...
    def lookup_many(self, ips: Sequence[_IpLike]) -> list[RepMatch | None]: ...
    def record(self, ip: _IpLike, event: str, now: int, n: int = 1) -> None: ...
    def counters(self, ip: _IpLike) -> dict[str, tuple[int, int]]: ...
    def sweep(self, now: int, older_than: int, limit: int = 10000) -> SweepResult:
        """Forget counters whose last event is more than ``older_than`` s before ``now``.

        Scans at most ``limit`` counters from where the previous call
        stopped, in one write transaction; a counter with events still in
        the group-commit buffer is kept.
        """

@final
class Membership:
    """The answer of ``Community.member``: the first match, or unknown."""

    @property
    def status(self) -> _MemberStatus: ...
    @property
    def entry(self) -> str | None: ...
    @property
    def scope(self) -> Literal["user", "org"] | None: ...
    @property
    def source(self) -> _Source | None: ...

@final
class CommunityEntry:
    @property
    def entry(self) -> str: ...
    @property
    def kind(self) -> _Kind: ...
    @property
    def source(self) -> _Source: ...
    @property
    def added(self) -> int: ...

@final
class Community:
    """Layer 5's table: each user's allowed and blocked senders."""

    def add(
        self, user: str, entry: str, kind: _Kind = "allow", source: _Source = "manual", now: int = 0
    ) -> bool: ...
    def add_many(
        self,
        user: str,
        entries: Iterable[str],
        kind: _Kind = "allow",
        source: _Source = "import",
        now: int = 0,
    ) -> int: ...
    def remove(self, user: str, entry: str) -> bool: ...
    def clear(self, user: str) -> int:
        """Remove every entry of ``user`` (a user who leaves), in one transaction."""
    def list(self, user: str) -> list[CommunityEntry]: ...
    def member(
        self, user: str, sender: str, list_id: str | None = None, org: str | None = None
    ) -> Membership: ...
    def member_many(
        self, queries: Sequence[tuple[str, str, str | None, str | None]]
    ) -> builtins.list[Membership]: ...
    def count(self, user: str) -> int: ...

def normalize_address(address: str) -> str:
    """Fold an address as the community table does (lower case, A-label domain)."""

def normalize_entry(entry: str) -> str:
    """Fold a community entry: an address, ``@domain`` or ``list:<List-Id>``."""

@final
class Core:
    """One LMDB environment under ``path``; open it once per process, after fork.

    ``ipv4_prefix``/``ipv6_prefix`` of None adopt the lengths stored in an
    existing environment (the CLI's choice); a value that differs from the
    stored one raises ``ConfigMismatchError``.

    ``commit_window_ms`` is the group-commit window of Recon sightings and
    reputation events: a crash forgets at most that much of them.
    """

    def __new__(
        cls,
        path: str,
        *,
        map_size: int = 64 << 30,
        ipv4_prefix: int | None = 32,
        ipv6_prefix: int | None = 64,
        min_delay: int = 60,
        retry_window: int = 86400,
        pass_ttl: int = 2592000,
        commit_window_ms: int = 100,
        ipv6_new_per_48: int = 4096,
        max_readers: int = 1024,
    ) -> Core: ...
    @property
    def recon(self) -> Recon: ...
    @property
    def reputation(self) -> Reputation: ...
    @property
    def community(self) -> Community: ...
    @property
    def path(self) -> str: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def copy_to(self, path: str, *, compact: bool = True) -> None:
        """A consistent copy of the environment into ``path``, as ``path/data.mdb``.

        ``path`` is a new directory (its parent existing) or an empty one;
        anything else raises ``InvalidInputError``. LMDB copies one read
        transaction's snapshot, so writers of every process go on meanwhile;
        ``compact`` leaves free pages out. Rows still in this process's
        group-commit buffer are not in it: ``flush`` first. The copy opens
        as ``Core(path, ipv4_prefix=None, ipv6_prefix=None)``.
        """
    def stats(self) -> dict[str, int]: ...
