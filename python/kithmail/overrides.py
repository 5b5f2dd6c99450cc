"""Policy overrides in the database: global (scope '') and per tenant, with provenance.

DESIGN.md's Tenants: policy comes from, weakest first, built-in defaults →
the config file → global overrides (global admins) → a tenant's overrides
(its admins). This module is the two database layers: it validates an
override exactly as the config file's value would be validated (the value
is merged into the settings and `config.from_mapping` runs, so a bad value
gets the file's message), stores it (`overrides` table of `kithmail.db`,
one JSON value per dotted key), audit-logs every change, builds the
effective `config.Settings` of a tenant, and explains where each value in
force comes from (`explain`).

What may be overridden is a closed list (`keys`): a key that some layer
reads per tenant, through `kithmail.tenants.Policies`, or that SAV reads
per tenant. Listeners, data_dir, hostname, TLS files, DNS, domains, the
clamd address and the core's shape stay in the file (a restart or a
SIGHUP changes them); a tenant admin may change only the tenant keys,
never Recon's timings (the Recon table is shared by every tenant) nor the
gateway-wide rates and quotas.

Every worker sees a change within about a second: the `overrides`
generation (moved by the database's triggers on every change) is looked at
at most once a second (`generation`), and the settings are rebuilt only
when it moved. A stored override that no longer validates (the file
changed under it) is skipped with a warning; the rest still apply.

Trusts nothing it is given: the scope must name a tenant, the key must be
in the list for the scope, and the value is a bounded JSON value (string,
number, bool, null or a list of strings) that must validate.
"""

from __future__ import annotations

import collections
import difflib
import json
import logging
import math
import threading
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from kithmail import config
from kithmail.db import Database, InvalidError, NotFoundError, fold_tenant

__all__ = [
    "REFRESH_S",
    "KeyInfo",
    "OverrideError",
    "Overrides",
    "Source",
    "file_keys_of",
    "keys",
]

log = logging.getLogger("kithmail.overrides")

Origin = Literal["built-in", "file", "global", "tenant"]
Role = Literal["global_admin", "tenant_admin"]

# How stale a worker's view of the overrides may be (as `Database.tenant_of`).
REFRESH_S: Final = 1.0
# Effective settings kept per process: tenants with overrides of their own
# (a tenant with none shares the global settings object).
CACHE_TENANTS: Final = 1024
MAX_STRING: Final = 1000
MAX_LIST: Final = 1000
MAX_JSON: Final = 64 * 1024


class OverrideError(ValueError):
    """An override refused; the message names the key and says why, fit for an admin."""


@dataclass(frozen=True, slots=True)
class Source:
    """One value in force and where it comes from."""

    key: str  # dotted: "spf.softfail"
    value: Any  # JSON-able, in the file's notation ("60s", "25MiB")
    origin: Origin
    replaces: Any  # what the next-weaker origin gives; == value for "built-in"
    replaces_origin: Origin | None


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One key an admin may override."""

    key: str
    section: str
    kind: str  # "action" | "bool" | "mode" | "duration" | "size" | "int" | "list" | "str"
    choices: tuple[str, ...]  # allowed values of an enum, else ()
    description: str
    tenant: bool  # may a tenant admin override it


# --------------------------------------------------------------- the catalogue

# section -> (key, may a tenant override it), in the config's order. Only
# keys read per tenant (through `Policies`, or by SAV per tenant) are here:
# a global override of anything read once per process would silently do
# nothing.
_CATALOGUE: Final[dict[str, tuple[tuple[str, bool], ...]]] = {
    "recon": (
        ("enabled", True),
        ("mode", True),
        # The Recon table is shared: its timings are one for all tenants.
        ("min_delay", False),
        ("retry_window", False),
        ("pass_ttl", False),
        ("exempt_networks", True),
        ("exempt_senders", True),
        ("exempt_recipients", True),
    ),
    "reputation": (
        ("mode", True),
        ("dnsbl", True),
        ("on_listed", True),
        ("learned_action", True),
        ("learned_threshold", True),
    ),
    "spf": tuple(
        (k, True)
        for k in ("mode", "pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
    ),
    "dkim": (("mode", True), ("fail", True)),
    "dmarc": (("mode", True), ("enforce", True)),
    "arc": (("trusted_sealers", False),),
    "spoofing": (("mode", True), ("own_domains", True)),
    "antivirus": (
        ("mode", True),
        ("on_virus", True),
        ("on_error", True),
        ("on_unscannable", True),
        ("max_size", False),
        ("on_oversize", True),
        ("timeout", False),
    ),
    "community": (
        ("mode", False),
        ("sav", True),
        # Weakens what counts as authenticated: the gateway's operator decides.
        ("require_auth", False),
        ("quarantine_days", True),
        ("challenge_interval", True),
        ("challenge_rate_per_domain", False),
        ("challenge_rate_global", False),
        ("quarantine_quota", False),
    ),
}

# For the keys whose config field has no description of its own.
_DESCRIPTIONS: Final[dict[str, str]] = {
    "recon.enabled": "Recon (greylisting by source address) on or off",
    "recon.mode": "enforce, or shadow: decide and record, don't act",
    "recon.min_delay": "A new source's retry passes after this long",
    "recon.retry_window": "A retry later than this after first sight counts as new",
    "recon.pass_ttl": "How long a source that passed skips Recon (renewed by accepted mail)",
    "recon.exempt_networks": "Sources never deferred by Recon",
    "recon.exempt_recipients": "Recipients whose mail Recon never defers",
    "reputation.mode": "enforce, or shadow: decide and record, don't act",
    "reputation.dnsbl": "DNSBL zones asked about each source Recon let through",
    "reputation.on_listed": "Action for a source a DNSBL lists",
    "reputation.learned_action": "Action for a source the gateway's own score condemns",
    "reputation.learned_threshold": "Score from which the learned action applies",
    "spf.mode": "enforce, or shadow: decide and record, don't act",
    "spf.pass": "Action for SPF pass",
    "spf.fail": "Action for SPF fail (-all)",
    "spf.softfail": "Action for SPF softfail (~all)",
    "spf.neutral": "Action for SPF neutral (?all)",
    "spf.none": "Action when the sender's domain publishes no SPF",
    "spf.temperror": "Action when SPF could not be checked for now (DNS)",
    "spf.permerror": "Action for a broken SPF record",
    "dkim.mode": "enforce, or shadow: decide and record, don't act",
    "dkim.fail": "Action for a DKIM signature that does not verify",
    "dmarc.mode": "enforce, or shadow: decide and record, don't act",
    "dmarc.enforce": "Apply the sender domain's DMARC policy (p=quarantine, p=reject)",
    "arc.trusted_sealers": "ARC sealers whose Authentication-Results are believed",
    "spoofing.mode": "enforce, or shadow: decide and record, don't act",
    "community.mode": "enforce, or shadow: decide and record, don't act",
    "community.sav": "Send Sender Address Verification challenges for held mail",
    "community.require_auth": "Only an authenticated From counts as a community member",
    "community.quarantine_days": "Days a held message is kept",
    "community.challenge_interval": "At most one challenge per user and sender in this time",
    "community.challenge_rate_per_domain": "Challenges per sender domain per hour",
    "community.challenge_rate_global": "Challenges per hour, all domains together",
    "community.quarantine_quota": "Held mail one user may have",
}


def _field(section: str, key: str) -> FieldInfo:
    model = _section_model(section)
    for name, f in model.model_fields.items():
        if (f.alias or name) == key:
            return f
    raise KeyError(f"{section}.{key}")


def _section_model(section: str) -> type[BaseModel]:
    ann = config.Settings.model_fields[section].annotation
    assert isinstance(ann, type) and issubclass(ann, BaseModel)
    return ann


def _kind(f: FieldInfo) -> tuple[str, tuple[str, ...]]:
    for m in f.metadata:
        if isinstance(m, BeforeValidator):
            if m.func is config.parse_duration:
                return "duration", ()
            if m.func is config.parse_size:
                return "size", ()
    ann: Any = f.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) is typing.Union or type(ann).__name__ == "UnionType":
        ann = args[0] if len(args) == 1 else ann  # `Action | None`
    if typing.get_origin(ann) is Literal:
        choices = tuple(str(c) for c in typing.get_args(ann))
        return ("mode" if set(choices) == {"enforce", "shadow"} else "action"), choices
    if ann is bool:
        return "bool", ()
    if ann is int:
        return "int", ()
    if typing.get_origin(ann) is list:
        return "list", ()
    return "str", ()


def _build_catalogue() -> tuple[KeyInfo, ...]:
    out = []
    for section in config.Settings.model_fields:  # the config's order
        for key, tenant in _CATALOGUE.get(section, ()):
            f = _field(section, key)
            kind, choices = _kind(f)
            dotted = f"{section}.{key}"
            out.append(
                KeyInfo(
                    key=dotted,
                    section=section,
                    kind=kind,
                    choices=choices,
                    description=f.description or _DESCRIPTIONS.get(dotted, ""),
                    tenant=tenant,
                )
            )
    return tuple(out)


_KEYS: Final = _build_catalogue()
_BY_KEY: Final = {k.key: k for k in _KEYS}
_TENANT_KEYS: Final = tuple(k for k in _KEYS if k.tenant)


def keys(role: Role) -> tuple[KeyInfo, ...]:
    """What `role` may override, in the config file's order."""
    if role == "global_admin":
        return _KEYS
    if role == "tenant_admin":
        return _TENANT_KEYS
    raise ValueError(f"no overrides for role {role!r}")


def file_keys_of(settings: config.Settings) -> frozenset[str]:
    """The dotted keys the config file set explicitly ("file" rather than "built-in").

    Read from the validated settings themselves (pydantic's fields-set of
    each section), so no second parse of the file is needed.
    """
    out: set[str] = set()
    for section in config.Settings.model_fields:
        value = getattr(settings, section, None)
        if not isinstance(value, BaseModel):
            continue
        fields = type(value).model_fields
        for name in value.model_fields_set:
            f = fields.get(name)
            out.add(f"{section}.{(f.alias if f is not None else None) or name}")
    return frozenset(out)


# --------------------------------------------------------------- values


def format_duration(seconds: float) -> str:
    """Seconds in the file's notation, exactly: 60.0 → "1m", 0.25 → "250ms"."""
    if seconds != int(seconds):
        return f"{round(seconds * 1000)}ms"
    n = int(seconds)
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}s"


def format_size(n: int) -> str:
    """Bytes in the file's notation, exactly: 26214400 → "25MiB"."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"


def _shown(info: KeyInfo, value: Any) -> Any:
    """A settings value as JSON, in the notation an admin writes in the file."""
    if value is None:
        return None
    if info.kind == "duration":
        return format_duration(float(value))
    if info.kind == "size":
        return format_size(int(value))
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _value_of(settings: config.Settings, info: KeyInfo) -> Any:
    section = getattr(settings, info.section)
    name = next(n for n, f in type(section).model_fields.items() if (f.alias or n) == _leaf(info))
    return _shown(info, getattr(section, name))


def _leaf(info: KeyInfo) -> str:
    return info.key.partition(".")[2]


def _check_json(key: str, value: Any) -> None:
    """A bounded JSON value of the shapes config values have."""
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise OverrideError(f"`{key}`: {value!r} is not a number an admin can mean")
        return
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise OverrideError(f"`{key}`: the value is longer than {MAX_STRING} characters")
        return
    if isinstance(value, list):
        if len(value) > MAX_LIST:
            raise OverrideError(f"`{key}`: more than {MAX_LIST} entries")
        for v in value:
            if not isinstance(v, str):
                raise OverrideError(f"`{key}`: a list's entries are strings, not {v!r}")
            if len(v) > MAX_STRING:
                raise OverrideError(f"`{key}`: an entry is longer than {MAX_STRING} characters")
        if len(json.dumps(value)) > MAX_JSON:
            raise OverrideError(f"`{key}`: the value is larger than {MAX_JSON} bytes")
        return
    raise OverrideError(
        f"`{key}`: a value is a string, number, true/false or a list of strings, "
        f"not {type(value).__name__}"
    )


def _scope_name(scope: str) -> str:
    return "global" if scope == "" else f"tenant {scope}"


# --------------------------------------------------------------- the overrides


@dataclass(frozen=True, slots=True)
class _Rows:
    generation: int
    scopes: dict[str, dict[str, Any]]  # scope -> dotted key -> value (decoded JSON)
    checked: float  # time.monotonic() of the last look at the generation


@dataclass(frozen=True, slots=True)
class _Built:
    settings: config.Settings
    applied: frozenset[tuple[str, str]]  # the (scope, key) overrides that took effect


class Overrides:
    """The global and tenant overrides of one database, over the file's settings.

    `base()` gives the file's settings now in force (a SIGHUP changes them);
    `file_keys()` the keys the file set explicitly (default: read from
    `base()` by `file_keys_of`). `set` and `unset` write to the database:
    call them in a thread, not on an event loop.
    """

    def __init__(
        self,
        database: Database,
        base: Callable[[], config.Settings],
        file_keys: Callable[[], frozenset[str]] | None = None,
    ) -> None:
        self.database = database
        self._base = base
        self._file_keys = file_keys or (lambda: file_keys_of(self._base()))
        self._rows: _Rows | None = None
        self._lock = threading.Lock()  # guards the caches below
        # tenant (None: global) -> (generation, base, built)
        self._built: collections.OrderedDict[str | None, tuple[int, config.Settings, _Built]] = (
            collections.OrderedDict()
        )
        self._dumped: tuple[config.Settings, dict[str, Any]] | None = None
        self._warned: set[tuple[int, str, str]] = set()

    # --- reading ---

    def generation(self) -> int:
        """The overrides generation, looked at in the database at most once a second."""
        return self._current().generation

    def refresh(self) -> None:
        """Look at the database on the next read (after a change made here)."""
        self._rows = None

    def _current(self) -> _Rows:
        now = time.monotonic()
        rows = self._rows
        if rows is not None and now - rows.checked < REFRESH_S:
            return rows
        found = self.database.read("SELECT n FROM generations WHERE name = 'overrides'")
        generation = int(typing.cast(int, found[0][0])) if found else 0
        if rows is not None and rows.generation == generation:
            self._rows = _Rows(generation, rows.scopes, now)
            return self._rows
        # One statement, so the generation read matches the rows read.
        scopes: dict[str, dict[str, Any]] = {}
        got = self.database.read(
            "SELECT g.n, o.scope, o.key, o.value FROM generations AS g"
            " LEFT JOIN overrides AS o WHERE g.name = 'overrides'"
        )
        for n, scope, key, value in got:
            generation = int(typing.cast(int, n))
            if scope is None:
                continue
            try:
                decoded = json.loads(typing.cast(str, value))
            except ValueError:
                log.warning("override %s of %s is not JSON; ignored", key, _scope_name(str(scope)))
                continue
            scopes.setdefault(str(scope), {})[str(key)] = decoded
        self._rows = _Rows(generation, scopes, now)
        return self._rows

    def get(self, scope: str) -> dict[str, Any]:
        """The overrides of one scope ('' global, else a tenant's name), fresh from the database."""
        rows = self.database.read(
            "SELECT key, value FROM overrides WHERE scope = ? ORDER BY key", (scope,)
        )
        out: dict[str, Any] = {}
        for key, value in rows:
            with_value = typing.cast(str, value)
            try:
                out[str(key)] = json.loads(with_value)
            except ValueError:
                continue
        return out

    def effective(self, tenant: str | None) -> config.Settings:
        """The settings in force for `tenant` (None: the file and the global overrides)."""
        return self._effective(tenant).settings

    def _effective(self, tenant: str | None) -> _Built:
        rows = self._current()
        base = self._base()
        with self._lock:
            hit = self._built.get(tenant)
            if hit is not None and hit[0] == rows.generation and hit[1] is base:
                self._built.move_to_end(tenant)
                return hit[2]
        if tenant is None:
            built = self._build(base, rows, [("", rows.scopes.get("", {}))])
        else:
            own = rows.scopes.get(tenant)
            if not own:
                built = self._effective(None)  # shared: one object for every plain tenant
            else:
                glob = self._effective(None)
                built = self._build(base, rows, [("", _applied(rows, "", glob)), (tenant, own)])
        with self._lock:
            self._built[tenant] = (rows.generation, base, built)
            self._built.move_to_end(tenant)
            while len(self._built) > CACHE_TENANTS:
                self._built.popitem(last=False)
        return built

    def _dump(self, base: config.Settings) -> dict[str, Any]:
        d = self._dumped
        if d is None or d[0] is not base:
            d = (base, base.model_dump(by_alias=True))
            self._dumped = d
        return d[1]

    def _build(
        self,
        base: config.Settings,
        rows: _Rows,
        layers: list[tuple[str, Mapping[str, Any]]],
    ) -> _Built:
        wanted: list[tuple[str, str, Any]] = []
        for scope, values in layers:
            allowed = _BY_KEY if scope == "" else {k.key: k for k in _TENANT_KEYS}
            for key, value in values.items():
                if key not in allowed:
                    self._warn(rows.generation, scope, key, "not a key this scope may set")
                    continue
                wanted.append((scope, key, value))
        if not wanted:
            return _Built(base, frozenset())
        data = _merge(self._dump(base), [(k, v) for _, k, v in wanted])
        try:
            settings = config.from_mapping(data, base.source)
            return _Built(settings, frozenset((s, k) for s, k, _ in wanted))
        except config.ConfigError:
            pass
        # Some override no longer validates over this file: keep the ones that do.
        kept: list[tuple[str, str, Any]] = []
        settings = base
        for scope, key, value in wanted:
            try:
                settings = config.from_mapping(
                    _merge(self._dump(base), [(k, v) for _, k, v in [*kept, (scope, key, value)]]),
                    base.source,
                )
            except config.ConfigError as e:
                self._warn(rows.generation, scope, key, str(e))
                continue
            kept.append((scope, key, value))
        return _Built(settings, frozenset((s, k) for s, k, _ in kept))

    def _warn(self, generation: int, scope: str, key: str, why: str) -> None:
        mark = (generation, scope, key)
        if mark not in self._warned:
            if len(self._warned) > 10000:
                self._warned.clear()
            self._warned.add(mark)
            log.warning("override %s of %s ignored: %s", key, _scope_name(scope), why)

    # --- provenance ---

    def explain(self, tenant: str | None) -> list[Source]:
        """Every key `tenant`'s admins may override (None: every global key), and its origin."""
        if tenant is not None:
            tenant = self._scope(tenant)
        base = self._base()
        file_keys = self._file_keys()
        glob = self._effective(None)
        mine = self._effective(tenant) if tenant is not None else glob
        out: list[Source] = []
        for info in keys("global_admin" if tenant is None else "tenant_admin"):
            chain: list[tuple[Origin, Any]] = [("built-in", _value_of(_BUILTIN, info))]
            if info.key in file_keys:
                chain.append(("file", _value_of(base, info)))
            if ("", info.key) in glob.applied:
                chain.append(("global", _value_of(glob.settings, info)))
            if tenant is not None and (tenant, info.key) in mine.applied:
                chain.append(("tenant", _value_of(mine.settings, info)))
            origin, value = chain[-1]
            if len(chain) == 1:
                out.append(Source(info.key, value, origin, value, None))
            else:
                out.append(Source(info.key, value, origin, chain[-2][1], chain[-2][0]))
        return out

    # --- changing ---

    def _scope(self, scope: str) -> str:
        if scope == "":
            return ""
        try:
            name = fold_tenant(scope)
            return self.database.tenant(name).name
        except (InvalidError, NotFoundError):
            raise OverrideError(f"no tenant named {scope[:100]!r}") from None

    def _info(self, scope: str, key: str) -> KeyInfo:
        if not isinstance(key, str) or len(key) > 200:
            raise OverrideError("a key is a dotted name like `spf.softfail`")
        info = _BY_KEY.get(key)
        if info is None:
            section, _, leaf = key.partition(".")
            known = section in config.Settings.model_fields and any(
                (f.alias or n) == leaf
                for n, f in _section_model(section).model_fields.items()
                if section != "source"
            )
            if known:
                raise OverrideError(
                    f"`{key}` cannot be overridden here: it is set in the config file"
                )
            close = difflib.get_close_matches(key, list(_BY_KEY), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise OverrideError(f"unknown key `{key}`{hint}")
        if scope != "" and not info.tenant:
            raise OverrideError(
                f"`{key}` is the same for every tenant: only a global admin may override it"
            )
        return info

    def validate(self, scope: str, key: str, value: Any) -> Any:
        """The value as it would be stored (the file's notation); OverrideError when refused."""
        scope = self._scope(scope)
        info = self._info(scope, key)
        _check_json(key, value)
        rows = self._current()
        base = self._base()
        # The others in force beside it: this one must validate with them.
        changes = list(_applied(rows, "", self._effective(None)).items())
        if scope != "":
            changes += _applied(rows, scope, self._effective(scope)).items()
        changes = [(k, v) for k, v in changes if k != key]
        where = f"{_scope_name(scope)} override"
        try:
            # Without the others first: the message then names only this key.
            checked = config.from_mapping(_merge(self._dump(base), [(key, value)]), where)
            config.from_mapping(_merge(self._dump(base), [*changes, (key, value)]), where)
        except config.ConfigError as e:
            raise OverrideError(str(e)) from None
        return _value_of(checked, info)

    def set(self, scope: str, key: str, value: Any, *, actor: str) -> None:
        """Validate and store one override; audit-logged as ``policy.set``."""
        stored = self.validate(scope, key, value)
        scope = self._scope(scope)
        encoded = json.dumps(stored, separators=(",", ":"))
        now = int(time.time())
        with self.database.write() as conn:
            conn.execute(
                "INSERT INTO overrides (scope, key, value, changed_at, changed_by)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, key) DO UPDATE SET"
                " value = excluded.value, changed_at = excluded.changed_at,"
                " changed_by = excluded.changed_by",
                (scope, key, encoded, now, actor),
            )
        self.database.audit(actor, "policy.set", tenant=scope, target=key, detail=encoded)
        self.refresh()
        log.info("override %s of %s set to %s by %s", key, _scope_name(scope), encoded, actor)

    def unset(self, scope: str, key: str, *, actor: str) -> None:
        """Remove one override (nothing to remove is not an error); audit-logged ``policy.unset``."""
        scope = self._scope(scope)
        if not isinstance(key, str) or len(key) > 200:
            raise OverrideError("a key is a dotted name like `spf.softfail`")
        info = _BY_KEY.get(key)
        if scope != "" and info is not None and not info.tenant:
            raise OverrideError(
                f"`{key}` is the same for every tenant: only a global admin may override it"
            )
        # A key no longer in the list may still be removed (a stale row).
        with self.database.write() as conn:
            gone = conn.execute(
                "DELETE FROM overrides WHERE scope = ? AND key = ?", (scope, key)
            ).rowcount
        if gone:
            self.database.audit(actor, "policy.unset", tenant=scope, target=key)
            self.refresh()
            log.info("override %s of %s removed by %s", key, _scope_name(scope), actor)


_BUILTIN: Final = config.Settings()


def _applied(rows: _Rows, scope: str, built: _Built) -> dict[str, Any]:
    """The overrides of `scope` that took effect in `built`."""
    return {k: v for k, v in rows.scopes.get(scope, {}).items() if (scope, k) in built.applied}


def _merge(data: Mapping[str, Any], changes: list[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of the settings mapping with dotted `changes` applied (sections copied once)."""
    out = dict(data)
    copied: set[str] = set()
    for key, value in changes:
        section, _, leaf = key.partition(".")
        if section not in copied:
            out[section] = dict(out.get(section) or {})
            copied.add(section)
        out[section][leaf] = value
    return out
