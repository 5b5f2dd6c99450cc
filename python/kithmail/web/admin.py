"""The admin half of the web UI: tenants, policy, users, the organisation's community,
held mail, the dashboard, the audit log and API tokens.

Two kinds of admin (DESIGN.md's Tenants): a tenant admin runs one
organisation — its users, its policy overrides, its community and its
quarantine — and a global admin runs the gateway: tenants and their
domains, the global policy, every tenant. Every operation here takes the
principal first and scopes itself by it (`scope_tenant`, `managed_user`):
a tenant admin who names another tenant, or a user of another tenant,
gets 403 (a tenant) or the same 404 as for one that does not exist (a
user), whatever a URL, a form or a JSON body says. Only admins reach any
of it (`kithmail.web.auth.tenant_admin`), and every change needs the
session's CSRF token (`kithmail.web.security.csrf`) or an API token.

The operations (`op_*` and the readers) serve the pages here and the JSON
API (`kithmail.web.api_admin`) alike, so the two cannot disagree about
who may do what. Every change is recorded in the audit log (policy
changes by `kithmail.overrides` itself). Policy is validated as the config
file is (`kithmail.overrides.Overrides.validate`) and applies without a
restart: each worker sees a change within about a second.

Which domains are local is the config file's to say (``[domains] local``):
a global admin gives a local domain to a tenant here (moving it, with its
users); a new local domain is added to the file, and the gateway
reloaded, first. That is the honest limit of this UI.

Trusts: the database and the principal (`kithmail.web.auth`); nothing of
the request — every name, address and value is bounded and checked.
"""

from __future__ import annotations

import asyncio
import datetime
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeVar, cast
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import RedirectResponse, Response

from kithmail import db
from kithmail._core import InvalidInputError, normalize_entry
from kithmail.layers.community import org_user
from kithmail.quarantine import like_pattern
from kithmail.web import dashboard as dash
from kithmail.web.auth import (
    ApiToken,
    Forbidden,
    Principal,
    create_api_token,
    global_admin,
    list_api_tokens,
    may_manage_tenant,
    revoke_api_token,
    services_of,
    tenant_admin,
)
from kithmail.web.errors import ApiError
from kithmail.web.security import csrf
from kithmail.web.templating import ADMIN_NAV, NavLink, render

if TYPE_CHECKING:
    from kithmail.overrides import KeyInfo, Overrides, Source
    from kithmail.stats import Stats
    from kithmail.web.services import Services

__all__ = [
    "AuditRow",
    "HeldRow",
    "OrgEntry",
    "PolicyRow",
    "audit_rows",
    "dashboard_of",
    "existing_tenant",
    "form_value",
    "held_rows",
    "key_kind",
    "list_users",
    "managed_user",
    "one_tenant",
    "op_add_tenant",
    "op_add_user",
    "op_appoint",
    "op_create_token",
    "op_move_domain",
    "op_org_add",
    "op_org_remove",
    "op_reset_password",
    "op_revoke_token",
    "op_set_disabled",
    "op_set_policy",
    "op_set_role",
    "op_unset_policy",
    "org_entries",
    "policy_rows",
    "policy_scope",
    "router",
    "scope_tenant",
    "tenant_or_404",
    "visible_tokens",
]

router = APIRouter(prefix="/admin", include_in_schema=False)

Admin = Annotated[Principal, Depends(tenant_admin)]
Global = Annotated[Principal, Depends(global_admin)]
Csrf = Depends(csrf)

MAX_ADDRESS: Final = 320
MAX_NAME: Final = 64
MAX_VALUE: Final = 64 * 1024
MAX_FILTER: Final = 200
PAGE: Final = 50
ASSIGNABLE_BY_TENANT_ADMIN: Final = ("user", "tenant_admin")

ADMIN_NAV.extend(
    [
        NavLink("/admin/dashboard", "Dashboard"),
        NavLink("/admin/users", "Users"),
        NavLink("/admin/policy", "Policy"),
        NavLink("/admin/community", "Organisation"),
        NavLink("/admin/quarantine", "Held mail"),
        NavLink("/admin/audit", "Audit log"),
        NavLink("/admin/tenants", "Tenants", global_only=True),
        NavLink("/admin/tokens", "API tokens"),
    ]
)

T = TypeVar("T")


# ---------------------------------------------------------------- scope


def scope_tenant(p: Principal, requested: str | None) -> str | None:
    """The tenant a request is about: None for every tenant (global admins only).

    A tenant admin's is always their own; naming another (existing or not,
    so nothing is learnt) is 403. A global admin's is the one named, which
    must exist (404), or None.
    """
    requested = (requested or "").strip() or None
    if not p.is_global:
        if requested is not None and requested.lower() != p.tenant:
            raise Forbidden("that is another organisation's")
        return p.tenant
    if requested is None:
        return None
    return existing_tenant(p, requested)


def existing_tenant(p: Principal, name: str, database: db.Database | None = None) -> str:
    try:
        folded = db.fold_tenant(name[: MAX_NAME + 1])
    except db.InvalidError as e:
        raise ApiError(422, "invalid", str(e)) from None
    if not may_manage_tenant(p, folded):
        raise Forbidden("that is another organisation's")
    if database is not None:
        tenant_or_404(database, folded)
    return folded


def tenant_or_404(database: db.Database, name: str) -> db.Tenant:
    try:
        return database.tenant(name)
    except (db.NotFoundError, db.InvalidError):
        raise ApiError(404, "not_found", f"no tenant named {name[:MAX_NAME]!r}") from None


def one_tenant(s: Services, p: Principal, requested: str | None) -> str:
    """The single tenant a request acts on: a tenant admin's own, or the one a global admin names."""
    tenant = scope_tenant(p, requested)
    if tenant is None:
        raise ApiError(422, "invalid", "say which tenant (tenant=NAME)")
    tenant_or_404(s.database, tenant)
    return tenant


def managed_user(s: Services, p: Principal, address: str) -> db.User:
    """A user this admin manages; 404 for one of another tenant, exactly as for none."""
    try:
        user = s.database.user(address[: MAX_ADDRESS + 1])
    except (db.NotFoundError, db.InvalidError):
        raise ApiError(404, "not_found", "no such user") from None
    if not may_manage_tenant(p, user.tenant):
        raise ApiError(404, "not_found", "no such user")
    return user


def _not_over_a_global(p: Principal, user: db.User) -> None:
    if user.role == "global_admin" and not p.is_global:
        raise Forbidden("only a global admin may change a global admin")


async def _run(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """A blocking database call in a thread; the database's refusals as 4xx."""
    try:
        return await asyncio.to_thread(fn, *args, **kw)
    except db.NotFoundError as e:
        raise ApiError(404, "not_found", str(e)) from None
    except db.ConflictError as e:
        raise ApiError(409, "conflict", str(e)) from None
    except db.InvalidError as e:
        raise ApiError(422, "invalid", str(e)) from None


async def _audit(s: Services, p: Principal, action: str, **kw: str) -> None:
    await asyncio.to_thread(s.database.audit, p.actor, action, **kw)


async def _policy_changed(s: Services) -> None:
    if s.on_policy_change is not None:
        await s.on_policy_change()


# ---------------------------------------------------------------- users


async def op_add_user(
    s: Services, p: Principal, address: str, role: str, password: str | None
) -> tuple[db.User, str]:
    """A new user of a domain this admin manages; its password (generated when None)."""
    if len(address) > MAX_ADDRESS:
        raise ApiError(422, "invalid", "an address has at most 320 characters")
    try:
        folded = db.fold_address(address.strip())
    except db.InvalidError as e:
        raise ApiError(422, "invalid", str(e)) from None
    tenant = s.database.tenant_of(folded.rpartition("@")[2])
    if tenant is None:
        raise ApiError(422, "invalid", f"{folded.rpartition('@')[2]} is not a local domain")
    if not may_manage_tenant(p, tenant):
        raise Forbidden("that domain is another organisation's")
    if role not in db.ROLES:
        raise ApiError(422, "invalid", f"a role is one of {', '.join(db.ROLES)}")
    if not p.is_global and role not in ASSIGNABLE_BY_TENANT_ADMIN:
        raise Forbidden("only a global admin may make a global admin")
    user, secret = await _run(s.database.add_user, folded, password=password or None, role=role)
    await _audit(s, p, "user.add", tenant=user.tenant, target=user.address, detail=f"role={role}")
    return user, secret


async def op_set_disabled(s: Services, p: Principal, address: str, disabled: bool) -> db.User:
    user = managed_user(s, p, address)
    _not_over_a_global(p, user)
    if disabled and user.id == p.user_id:
        raise ApiError(422, "invalid", "you cannot disable yourself")
    changed = await _run(s.database.set_disabled, user.address, disabled)
    await _audit(
        s, p, "user.disable" if disabled else "user.enable", tenant=user.tenant, target=user.address
    )
    return changed


async def op_reset_password(s: Services, p: Principal, address: str) -> tuple[db.User, str]:
    """A new random password for the user, shown once; their sessions end with the old one."""
    user = managed_user(s, p, address)
    _not_over_a_global(p, user)
    password = db.generate_password()
    changed = await _run(s.database.set_password, user.address, password)
    await _audit(s, p, "user.password_reset", tenant=user.tenant, target=user.address)
    return changed, password


async def op_set_role(s: Services, p: Principal, address: str, role: str) -> db.User:
    user = managed_user(s, p, address)
    _not_over_a_global(p, user)
    if role not in db.ROLES:
        raise ApiError(422, "invalid", f"a role is one of {', '.join(db.ROLES)}")
    if not p.is_global and role not in ASSIGNABLE_BY_TENANT_ADMIN:
        raise Forbidden("only a global admin may make a global admin")
    changed = await _run(s.database.set_role, user.address, role)
    if changed.role != user.role:
        await _audit(
            s,
            p,
            "user.role",
            tenant=user.tenant,
            target=user.address,
            detail=f"{user.role} -> {changed.role}",
        )
    return changed


def list_users(
    s: Services, p: Principal, tenant: str | None, q: str = "", role: str = ""
) -> list[db.User]:
    scope = scope_tenant(p, tenant)
    if scope is not None:
        tenant_or_404(s.database, scope)
    users = s.database.users(scope)
    q = q.strip().lower()[:MAX_FILTER]
    return [u for u in users if (not q or q in u.address) and (not role or u.role == role)]


# ---------------------------------------------------------------- tenants (global admins)


async def op_add_tenant(s: Services, p: Principal, name: str) -> db.Tenant:
    if not p.is_global:
        raise Forbidden("global administrators only")
    tenant = await _run(s.database.add_tenant, name[: MAX_NAME + 1])
    await _audit(s, p, "tenant.add", tenant=tenant.name, target=tenant.name)
    return tenant


async def op_move_domain(s: Services, p: Principal, tenant: str, domain: str) -> db.Tenant:
    """Give one of the config's local domains, with its users, to ``tenant``."""
    if not p.is_global:
        raise Forbidden("global administrators only")
    name = existing_tenant(p, tenant, s.database)
    try:
        folded = db.fold_domain(domain.strip()[:256])
    except db.InvalidError as e:
        raise ApiError(422, "invalid", str(e)) from None
    if folded not in {d.lower() for d in s.settings().domains.local}:
        raise ApiError(
            422,
            "invalid",
            f"{folded} is not a local domain: add it to [domains] local in the config "
            "file and reload the gateway first",
        )
    before = s.database.tenant_of(folded) or ""
    await _run(s.database.set_domain_tenant, folded, name)
    if before != name:
        await _audit(s, p, "tenant.domain", tenant=name, target=folded, detail=f"from {before}")
        if before:
            await _audit(s, p, "tenant.domain", tenant=before, target=folded, detail=f"to {name}")
        await _policy_changed(s)
    return tenant_or_404(s.database, name)


async def op_appoint(s: Services, p: Principal, tenant: str, address: str) -> db.User:
    """Make a user of ``tenant`` one of its admins."""
    if not p.is_global:
        raise Forbidden("global administrators only")
    name = existing_tenant(p, tenant, s.database)
    user = managed_user(s, p, address)
    if user.tenant != name:
        raise ApiError(
            422, "invalid", f"{user.address} is a user of tenant {user.tenant}, not {name}"
        )
    if user.role == "global_admin":
        raise ApiError(422, "invalid", f"{user.address} is a global admin already")
    return await op_set_role(s, p, user.address, "tenant_admin")


# ---------------------------------------------------------------- policy


@dataclass(frozen=True, slots=True)
class PolicyRow:
    """One key as an admin sees it: its value in force, where that comes from, what it replaces."""

    key: str
    section: str
    kind: str
    choices: tuple[str, ...]
    description: str
    tenant_may: bool
    value: Any
    origin: str
    replaces: Any
    replaces_origin: str | None
    overridden_here: bool  # set in the scope being shown (so it can be removed)

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "section": self.section,
            "kind": self.kind,
            "choices": list(self.choices),
            "description": self.description,
            "tenant_may_override": self.tenant_may,
            "value": self.value,
            "origin": self.origin,
            "replaces": self.replaces,
            "replaces_origin": self.replaces_origin,
            "overridden_here": self.overridden_here,
        }

    @property
    def shown(self) -> str:
        return _show(self.value)

    @property
    def replaces_shown(self) -> str:
        return _show(self.replaces)

    @property
    def lines(self) -> str:
        """A list value as the form's textarea shows it: one item a line."""
        if isinstance(self.value, list):
            return "\n".join(str(x) for x in self.value)
        return self.shown


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return ", ".join(str(x) for x in value) if value else "(empty)"
    return str(value)


def _overrides(s: Services) -> Overrides:
    if s.overrides is None:
        raise ApiError(409, "conflict", "policy overrides are not available in this process")
    return cast("Overrides", s.overrides)


def policy_scope(p: Principal, requested: str | None) -> str:
    """The override scope: '' (global, global admins only) or a tenant's name."""
    if p.is_global:
        return "" if not (requested or "").strip() else existing_tenant(p, requested or "")
    if requested is None or requested.strip().lower() == p.tenant:
        return p.tenant
    raise Forbidden("that is another organisation's policy")


def policy_rows(s: Services, p: Principal, scope: str) -> list[PolicyRow]:
    """Every key ``p`` may change in ``scope``, with its value in force and its origin."""
    from kithmail.overrides import keys

    ov = _overrides(s)
    if scope:
        tenant_or_404(s.database, scope)
    infos: dict[str, KeyInfo] = {k.key: k for k in keys("global_admin")}
    mine = ov.get(scope)
    sources: list[Source] = ov.explain(scope or None)
    rows = []
    for src in sources:
        info = infos[src.key]
        rows.append(
            PolicyRow(
                key=src.key,
                section=info.section,
                kind=info.kind,
                choices=tuple(info.choices),
                description=info.description,
                tenant_may=info.tenant,
                value=src.value,
                origin=src.origin,
                replaces=src.replaces,
                replaces_origin=src.replaces_origin,
                overridden_here=src.key in mine,
            )
        )
    return rows


def form_value(kind: str, text: str) -> Any:
    """A form field's text as the JSON value an override of ``kind`` takes."""
    text = text.strip()
    if kind == "bool":
        if text.lower() in ("true", "on", "yes", "1"):
            return True
        if text.lower() in ("false", "off", "no", "0"):
            return False
        raise ApiError(422, "invalid", "say true or false")
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ApiError(422, "invalid", f"{text[:40]!r} is not a whole number") from None
    if kind == "list":
        return [line.strip() for line in text.replace(",", "\n").splitlines() if line.strip()]
    return text


async def op_set_policy(s: Services, p: Principal, scope: str, key: str, value: Any) -> None:
    from kithmail.overrides import OverrideError

    ov = _overrides(s)
    try:
        await asyncio.to_thread(ov.set, scope, key[:200], value, actor=p.actor)
    except OverrideError as e:
        raise ApiError(422, "invalid", str(e)) from None
    await _policy_changed(s)


async def op_unset_policy(s: Services, p: Principal, scope: str, key: str) -> None:
    from kithmail.overrides import OverrideError, keys

    ov = _overrides(s)
    allowed = {k.key for k in keys("global_admin" if scope == "" else "tenant_admin")}
    if key not in allowed:
        raise ApiError(422, "invalid", f"`{key[:200]}` is not a key this scope may override")
    try:
        await asyncio.to_thread(ov.unset, scope, key, actor=p.actor)
    except OverrideError as e:
        raise ApiError(422, "invalid", str(e)) from None
    await _policy_changed(s)


def key_kind(key: str) -> str:
    from kithmail.overrides import keys

    for k in keys("global_admin"):
        if k.key == key:
            return k.kind
    raise ApiError(422, "invalid", f"unknown key `{key[:200]}`")


# ---------------------------------------------------------------- the organisation's community


@dataclass(frozen=True, slots=True)
class OrgEntry:
    entry: str
    kind: str
    source: str
    added: int


def org_entries(s: Services, p: Principal, tenant: str) -> list[OrgEntry]:
    entries = s.core.community.list(org_user(tenant))
    return [OrgEntry(e.entry, e.kind, e.source, e.added) for e in entries]


def _entry(text: str) -> str:
    text = text.strip()
    if not text or len(text) > 512:
        raise ApiError(422, "invalid", "an entry is an address, @domain or list:<List-Id>")
    # Invisible and bidirectional formatting characters make an entry read
    # as something else; white space and controls are never part of one.
    if any(c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs") for c in text):
        raise ApiError(422, "invalid", "an entry holds no spaces, controls or invisible characters")
    try:
        return normalize_entry(text)
    except (InvalidInputError, ValueError) as e:
        raise ApiError(422, "invalid", f"{text[:100]!r} is not a community entry: {e}") from None


async def op_org_add(s: Services, p: Principal, tenant: str, entry: str, kind: str) -> str:
    if kind not in ("allow", "block"):
        raise ApiError(422, "invalid", "kind is allow or block")
    folded = _entry(entry)
    now = int(s.clock())
    await asyncio.to_thread(s.core.community.add, org_user(tenant), folded, kind, "admin", now)
    await _audit(s, p, f"community.{kind}", tenant=tenant, target="*", detail=folded)
    return folded


async def op_org_remove(s: Services, p: Principal, tenant: str, entry: str) -> bool:
    folded = _entry(entry)
    gone = bool(await asyncio.to_thread(s.core.community.remove, org_user(tenant), folded))
    if not gone:
        raise ApiError(404, "not_found", f"{folded} is not in the organisation's community")
    await _audit(s, p, "community.remove", tenant=tenant, target="*", detail=folded)
    return gone


# ---------------------------------------------------------------- held mail


@dataclass(frozen=True, slots=True)
class HeldRow:
    queue_id: str
    rcpt_index: int
    tenant: str
    user: str
    sender: str
    subject: str
    layer: str
    reason: str
    size: int
    held_at: int
    expires_at: int

    def as_json(self) -> dict[str, Any]:
        return {
            "queue_id": self.queue_id,
            "rcpt_index": self.rcpt_index,
            "tenant": self.tenant,
            "user": self.user,
            "sender": self.sender,
            "subject": self.subject,
            "layer": self.layer,
            "reason": self.reason,
            "size": self.size,
            "held_at": self.held_at,
            "expires_at": self.expires_at,
        }


def held_rows(
    s: Services,
    p: Principal,
    tenant: str | None,
    *,
    user: str = "",
    sender: str = "",
    reason: str = "",
    limit: int = PAGE,
    offset: int = 0,
) -> tuple[list[HeldRow], int]:
    """Held copies across the tenant (or every tenant), newest first, and how many match."""
    scope = scope_tenant(p, tenant)
    where, params = ["1 = 1"], []
    if scope is not None:
        where.append("tenant = ?")
        params.append(scope)
    for column, value in (("user", user), ("sender", sender), ("reason", reason)):
        value = value.strip().lower()[:MAX_FILTER]
        if value:
            where.append(f"{column} LIKE ? ESCAPE '\\'")
            params.append(like_pattern(value))
    sql_where = " AND ".join(where)
    total = int(
        str(s.database.read(f"SELECT count(*) FROM quarantine WHERE {sql_where}", params)[0][0])
    )
    rows = s.database.read(
        "SELECT queue_id, rcpt_index, tenant, user, sender, subject, layer, reason, size,"
        f" held_at, expires_at FROM quarantine WHERE {sql_where}"
        " ORDER BY held_at DESC, queue_id DESC, rcpt_index DESC LIMIT ? OFFSET ?",
        [*params, max(1, min(limit, 500)), max(0, offset)],
    )
    return [
        HeldRow(
            str(r[0]),
            int(str(r[1])),
            str(r[2]),
            str(r[3]),
            str(r[4]),
            str(r[5]),
            str(r[6]),
            str(r[7]),
            int(str(r[8])),
            int(str(r[9])),
            int(str(r[10])),
        )
        for r in rows
    ], total


# ---------------------------------------------------------------- the audit log


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    at: int
    actor: str
    tenant: str
    action: str
    target: str
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at,
            "actor": self.actor,
            "tenant": self.tenant,
            "action": self.action,
            "target": self.target,
            "detail": self.detail,
        }


def audit_rows(
    s: Services,
    p: Principal,
    tenant: str | None,
    *,
    actor: str = "",
    action: str = "",
    target: str = "",
    since: int | None = None,
    until: int | None = None,
    before: int | None = None,
    limit: int = PAGE,
) -> list[AuditRow]:
    """Audit entries this admin may see (a tenant admin: their tenant's), newest first.

    ``actor`` and ``target`` match a part, ``action`` a prefix
    (``policy.``); ``since``/``until`` bound the time, ``before`` pages by id.
    """
    scope = scope_tenant(p, tenant)
    where, params = ["1 = 1"], cast(list[object], [])
    if scope is not None:
        where.append("tenant = ?")
        params.append(scope)
    if actor.strip():
        where.append("actor LIKE ? ESCAPE '\\'")
        params.append(like_pattern(actor.strip()[:MAX_FILTER]))
    if target.strip():
        where.append("target LIKE ? ESCAPE '\\'")
        params.append(like_pattern(target.strip()[:MAX_FILTER]))
    if action.strip():
        where.append("action LIKE ? ESCAPE '\\'")
        params.append(like_pattern(action.strip()[:MAX_FILTER])[1:])  # a prefix
    if since is not None:
        where.append("at >= ?")
        params.append(since)
    if until is not None:
        where.append("at < ?")
        params.append(until)
    if before is not None:
        where.append("id < ?")
        params.append(before)
    rows = s.database.read(
        "SELECT id, at, actor, tenant, action, target, detail FROM audit_log WHERE "
        + " AND ".join(where)
        + " ORDER BY id DESC LIMIT ?",
        [*params, max(1, min(limit, 500))],
    )
    return [
        AuditRow(
            int(str(r[0])), int(str(r[1])), str(r[2]), str(r[3]), str(r[4]), str(r[5]), str(r[6])
        )
        for r in rows
    ]


# ---------------------------------------------------------------- API tokens


def visible_tokens(s: Services, p: Principal) -> list[ApiToken]:
    """A global admin sees every token; a tenant admin their own."""
    return list_api_tokens(s.database, None if p.is_global else p.user_id)


async def op_create_token(s: Services, p: Principal, name: str, days: int | None) -> str:
    """A token acting as ``p`` (with exactly ``p``'s rights), for ``days`` (None: no expiry)."""
    if days is not None and not 1 <= days <= 3650:
        raise ApiError(422, "invalid", "a token lasts 1 to 3650 days (or leave it empty)")
    try:
        secret = await asyncio.to_thread(
            create_api_token,
            s.database,
            p.user_id,
            name[:200],
            ttl_s=None if days is None else days * 86400,
            now=int(s.clock()),
        )
    except ValueError as e:
        raise ApiError(422, "invalid", str(e)) from None
    # A global admin's own doings are the gateway's, not their domain's tenant's.
    tenant = "" if p.is_global else p.tenant
    await _audit(s, p, "token.create", tenant=tenant, target=" ".join(name.split())[:100])
    return secret


async def op_revoke_token(s: Services, p: Principal, token_id: int) -> None:
    mine = {t.id: t for t in visible_tokens(s, p)}
    token = mine.get(token_id)
    if token is None:
        raise ApiError(404, "not_found", "no such token")
    try:
        await asyncio.to_thread(revoke_api_token, s.database, token_id)
    except LookupError:
        raise ApiError(404, "not_found", "no such token") from None
    try:
        owner = s.database.user(token.address)
        tenant = "" if owner.role == "global_admin" else owner.tenant
    except db.DatabaseError:
        tenant = ""
    await _audit(s, p, "token.revoke", tenant=tenant, target=token.name, detail=token.address)


# ---------------------------------------------------------------- the dashboard


async def dashboard_of(request: Request, p: Principal, tenant: str | None) -> dash.Dashboard:
    s = services_of(request)
    scope = scope_tenant(p, tenant)
    pending: Stats | None = getattr(request.app.state, "stats", None)
    return await dash.build(s.database, s.clock(), scope, pending)


# ================================================================ the pages

_DONE: Final = {
    "tenant_added": "Tenant added.",
    "domain_moved": "Domain moved, with its users.",
    "appointed": "Tenant admin appointed.",
    "policy_set": "Saved. It applies to the next message.",
    "policy_unset": "Override removed: the weaker value applies again.",
    "disabled": "User disabled: their sessions have ended.",
    "enabled": "User enabled.",
    "role": "Role changed.",
    "entry_added": "Entry added.",
    "entry_removed": "Entry removed.",
    "revoked": "Token revoked.",
}


def _back(path: str, done: str, **params: str | None) -> RedirectResponse:
    query = {k: v for k, v in params.items() if v}
    query["done"] = done
    return RedirectResponse(f"{path}?{urlencode(query)}", status_code=303)


def _done(code: str) -> str:
    return _DONE.get(code, "")


def _tenants_for(s: Services, p: Principal) -> list[str]:
    if p.is_global:
        return [t.name for t in s.database.tenants()]
    return [p.tenant]


Str = Annotated[str, Form(max_length=MAX_ADDRESS)]
Name = Annotated[str, Form(max_length=MAX_NAME + 1)]
OptName = Annotated[str, Form(max_length=MAX_NAME + 1)]
# A policy form's scope: a tenant's name, or empty (FastAPI reads an empty
# field as absent) for the admin's own: a tenant admin's tenant, a global
# admin's global overrides. A tenant admin has no way to name the defaults.
ScopeForm = Annotated[str | None, Form(max_length=MAX_NAME + 1)]
TenantQ = Annotated[str, Query(max_length=MAX_NAME + 1)]
FilterQ = Annotated[str, Query(max_length=MAX_FILTER)]


@router.get("")
async def admin_home(p: Admin) -> Response:
    return RedirectResponse("/admin/dashboard", status_code=303)


@router.get("/dashboard")
async def dashboard_page(request: Request, p: Admin, tenant: TenantQ = "") -> Response:
    s = services_of(request)
    d = await dashboard_of(request, p, tenant)
    return render(
        request,
        "admin_dashboard.html",
        {
            "title": "Dashboard",
            "d": d,
            "tenants": _tenants_for(s, p),
            "chosen": d.tenant or "",
            "layers": dash.LAYERS,
            "layer_labels": dash.LAYER_LABELS,
            "actions": dash.ACTIONS,
            "outcomes": dash.OUTCOMES,
            "today_chart": dash.layer_bars(d.today_by_layer, title=f"Today ({d.today}), per layer"),
            "week_chart": dash.layer_bars(d.week_by_layer, title="The last 7 days, per layer"),
            "days_chart": dash.outcome_columns(
                d.per_day, d.days, title="What became of each recipient, per day"
            ),
        },
    )


# --- users


@router.get("/users")
async def users_page(
    request: Request, p: Admin, tenant: TenantQ = "", q: FilterQ = "", done: FilterQ = ""
) -> Response:
    s = services_of(request)
    scope = scope_tenant(p, tenant)
    users = list_users(s, p, scope, q)
    return render(
        request,
        "admin_users.html",
        {
            "title": "Users",
            "users": users[:1000],
            "more": max(0, len(users) - 1000),
            "tenants": _tenants_for(s, p),
            "chosen": scope or "",
            "q": q,
            "done": _done(done),
            "roles": db.ROLES if p.is_global else ASSIGNABLE_BY_TENANT_ADMIN,
            "shown_password": None,
        },
    )


@router.post("/users", dependencies=[Csrf])
async def users_add(
    request: Request,
    p: Admin,
    address: Str,
    role: Annotated[str, Form(max_length=20)] = "user",
    password: Annotated[str, Form(max_length=1024)] = "",
) -> Response:
    s = services_of(request)
    user, secret = await op_add_user(s, p, address, role, password or None)
    return render(
        request,
        "admin_password.html",
        {
            "title": "User added",
            "heading": f"Added {user.address}",
            "user": user,
            "password": secret if not password else None,
        },
    )


@router.get("/users/{address}")
async def user_page(request: Request, p: Admin, address: str, done: FilterQ = "") -> Response:
    s = services_of(request)
    user = managed_user(s, p, address)
    held = await asyncio.to_thread(s.quarantine.count_sync, user.address)
    return render(
        request,
        "admin_user.html",
        {
            "title": user.address,
            "user": user,
            "held": held,
            "done": _done(done),
            "roles": db.ROLES if p.is_global else ASSIGNABLE_BY_TENANT_ADMIN,
            "may_change": p.is_global or user.role != "global_admin",
        },
    )


@router.post("/users/{address}/disable", dependencies=[Csrf])
async def user_disable(request: Request, p: Admin, address: str) -> Response:
    user = await op_set_disabled(services_of(request), p, address, True)
    return _back(f"/admin/users/{user.address}", "disabled")


@router.post("/users/{address}/enable", dependencies=[Csrf])
async def user_enable(request: Request, p: Admin, address: str) -> Response:
    user = await op_set_disabled(services_of(request), p, address, False)
    return _back(f"/admin/users/{user.address}", "enabled")


@router.post("/users/{address}/password", dependencies=[Csrf])
async def user_password(request: Request, p: Admin, address: str) -> Response:
    user, secret = await op_reset_password(services_of(request), p, address)
    return render(
        request,
        "admin_password.html",
        {
            "title": "Password reset",
            "heading": f"New password for {user.address}",
            "user": user,
            "password": secret,
        },
    )


@router.post("/users/{address}/role", dependencies=[Csrf])
async def user_role(
    request: Request, p: Admin, address: str, role: Annotated[str, Form(max_length=20)]
) -> Response:
    user = await op_set_role(services_of(request), p, address, role)
    return _back(f"/admin/users/{user.address}", "role")


# --- tenants


@router.get("/tenants")
async def tenants_page(request: Request, p: Global, done: FilterQ = "") -> Response:
    s = services_of(request)
    tenants = s.database.tenants()
    local = sorted(d.lower() for d in s.settings().domains.local)
    owner = {d: t.name for t in tenants for d in t.domains}
    admins: dict[str, list[str]] = {}
    for u in s.database.users():
        if u.role == "tenant_admin":
            admins.setdefault(u.tenant, []).append(u.address)
    return render(
        request,
        "admin_tenants.html",
        {
            "title": "Tenants",
            "tenants": tenants,
            "local": local,
            "owner": owner,
            "admins": admins,
            "done": _done(done),
        },
    )


@router.post("/tenants", dependencies=[Csrf])
async def tenants_add(request: Request, p: Global, name: Name) -> Response:
    tenant = await op_add_tenant(services_of(request), p, name)
    return _back(f"/admin/tenants/{tenant.name}", "tenant_added")


@router.get("/tenants/{name}")
async def tenant_page(request: Request, p: Admin, name: str, done: FilterQ = "") -> Response:
    s = services_of(request)
    tenant = tenant_or_404(s.database, existing_tenant(p, name))
    rows = policy_rows(s, p, tenant.name)
    admins = [u for u in s.database.users(tenant.name) if u.role == "tenant_admin"]
    local = sorted(d.lower() for d in s.settings().domains.local)
    return render(
        request,
        "admin_tenant.html",
        {
            "title": f"Tenant {tenant.name}",
            "tenant": tenant,
            "overridden": [r for r in rows if r.origin == "tenant"],
            "admins": admins,
            "local": local,
            "done": _done(done),
        },
    )


@router.post("/tenants/{name}/domains", dependencies=[Csrf])
async def tenant_domain(
    request: Request, p: Global, name: str, domain: Annotated[str, Form(max_length=256)]
) -> Response:
    tenant = await op_move_domain(services_of(request), p, name, domain)
    return _back(f"/admin/tenants/{tenant.name}", "domain_moved")


@router.post("/tenants/{name}/admins", dependencies=[Csrf])
async def tenant_admins(request: Request, p: Global, name: str, address: Str) -> Response:
    s = services_of(request)
    await op_appoint(s, p, name, address)
    return _back(f"/admin/tenants/{existing_tenant(p, name)}", "appointed")


# --- policy


@router.get("/policy")
async def policy_page(
    request: Request, p: Admin, tenant: TenantQ = "", done: FilterQ = ""
) -> Response:
    s = services_of(request)
    scope = policy_scope(p, tenant or None)
    rows = policy_rows(s, p, scope)
    sections: dict[str, list[PolicyRow]] = {}
    for r in rows:
        sections.setdefault(r.section, []).append(r)
    # The reputation lists loaded into the core, for a global admin to see
    # beside the policy: they are loaded from files (`[reputation]
    # local_lists`, `kith reputation load`), the same for every tenant.
    lists = s.core.reputation.lists() if p.is_global and not scope else []
    return render(
        request,
        "admin_policy.html",
        {
            "title": "Policy",
            "scope": scope,
            "sections": sections,
            "tenants": _tenants_for(s, p),
            "done": _done(done),
            "lists": lists,
        },
    )


@router.post("/policy", dependencies=[Csrf])
async def policy_set(
    request: Request,
    p: Admin,
    key: Annotated[str, Form(max_length=200)],
    value: Annotated[str, Form(max_length=MAX_VALUE)] = "",
    tenant: ScopeForm = None,
) -> Response:
    s = services_of(request)
    scope = policy_scope(p, tenant)
    await op_set_policy(s, p, scope, key, form_value(key_kind(key), value))
    return _back("/admin/policy", "policy_set", tenant=scope or None)


@router.post("/policy/unset", dependencies=[Csrf])
async def policy_unset(
    request: Request,
    p: Admin,
    key: Annotated[str, Form(max_length=200)],
    tenant: ScopeForm = None,
) -> Response:
    s = services_of(request)
    scope = policy_scope(p, tenant)
    await op_unset_policy(s, p, scope, key)
    return _back("/admin/policy", "policy_unset", tenant=scope or None)


# --- the organisation's community


@router.get("/community")
async def community_page(
    request: Request, p: Admin, tenant: TenantQ = "", done: FilterQ = ""
) -> Response:
    s = services_of(request)
    tenants = _tenants_for(s, p)
    chosen = scope_tenant(p, tenant) or (tenants[0] if tenants else None)
    entries = org_entries(s, p, chosen) if chosen else []
    return render(
        request,
        "admin_community.html",
        {
            "title": "The organisation's community",
            "tenants": tenants,
            "chosen": chosen or "",
            "entries": entries,
            "done": _done(done),
        },
    )


@router.post("/community", dependencies=[Csrf])
async def community_add(
    request: Request,
    p: Admin,
    entry: Annotated[str, Form(max_length=512)],
    kind: Annotated[str, Form(max_length=10)] = "allow",
    tenant: OptName = "",
) -> Response:
    s = services_of(request)
    name = one_tenant(s, p, tenant)
    await op_org_add(s, p, name, entry, kind)
    return _back("/admin/community", "entry_added", tenant=name)


@router.post("/community/remove", dependencies=[Csrf])
async def community_remove(
    request: Request,
    p: Admin,
    entry: Annotated[str, Form(max_length=512)],
    tenant: OptName = "",
) -> Response:
    s = services_of(request)
    name = one_tenant(s, p, tenant)
    await op_org_remove(s, p, name, entry)
    return _back("/admin/community", "entry_removed", tenant=name)


# --- held mail


@router.get("/quarantine")
async def quarantine_page(
    request: Request,
    p: Admin,
    tenant: TenantQ = "",
    user: FilterQ = "",
    sender: FilterQ = "",
    reason: FilterQ = "",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> Response:
    s = services_of(request)
    scope = scope_tenant(p, tenant)
    rows, total = await asyncio.to_thread(
        held_rows,
        s,
        p,
        scope,
        user=user,
        sender=sender,
        reason=reason,
        limit=PAGE,
        offset=(page - 1) * PAGE,
    )
    query = {"tenant": scope or "", "user": user, "sender": sender, "reason": reason}
    return render(
        request,
        "admin_quarantine.html",
        {
            "title": "Held mail",
            "rows": rows,
            "total": total,
            "page": page,
            "pages": max(1, (total + PAGE - 1) // PAGE),
            "tenants": _tenants_for(s, p),
            "chosen": scope or "",
            "filters": query,
            "prev_query": urlencode({**query, "page": page - 1}),
            "next_query": urlencode({**query, "page": page + 1}),
        },
    )


# --- the audit log


def _day(text: str, *, end: bool = False) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        d = datetime.date.fromisoformat(text[:10])
    except ValueError:
        raise ApiError(422, "invalid", f"{text[:20]!r} is not a date (YYYY-MM-DD)") from None
    start = datetime.datetime(d.year, d.month, d.day, tzinfo=datetime.UTC)
    if end:
        start += datetime.timedelta(days=1)
    return int(start.timestamp())


@router.get("/audit")
async def audit_page(
    request: Request,
    p: Admin,
    tenant: TenantQ = "",
    actor: FilterQ = "",
    action: FilterQ = "",
    target: FilterQ = "",
    since: Annotated[str, Query(max_length=20)] = "",
    until: Annotated[str, Query(max_length=20)] = "",
    before: Annotated[int | None, Query(ge=1, le=2**62)] = None,
) -> Response:
    s = services_of(request)
    scope = scope_tenant(p, tenant)
    rows = await asyncio.to_thread(
        audit_rows,
        s,
        p,
        scope,
        actor=actor,
        action=action,
        target=target,
        since=_day(since),
        until=_day(until, end=True),
        before=before,
        limit=PAGE + 1,
    )
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    query = {
        "tenant": scope or "",
        "actor": actor,
        "action": action,
        "target": target,
        "since": since,
        "until": until,
    }
    return render(
        request,
        "admin_audit.html",
        {
            "title": "Audit log",
            "rows": rows,
            "tenants": _tenants_for(s, p),
            "chosen": scope or "",
            "filters": query,
            "next_query": urlencode({**query, "before": rows[-1].id}) if more and rows else "",
        },
    )


# --- API tokens


@router.get("/tokens")
async def tokens_page(request: Request, p: Admin, done: FilterQ = "") -> Response:
    s = services_of(request)
    return render(
        request,
        "admin_tokens.html",
        {
            "title": "API tokens",
            "tokens": visible_tokens(s, p),
            "done": _done(done),
            "secret": None,
        },
    )


@router.post("/tokens", dependencies=[Csrf])
async def tokens_create(
    request: Request,
    p: Admin,
    name: Annotated[str, Form(max_length=200)],
    days: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    s = services_of(request)
    try:
        n = int(days) if days.strip() else None
    except ValueError:
        raise ApiError(422, "invalid", "days is a whole number") from None
    secret = await op_create_token(s, p, name, n)
    return render(
        request,
        "admin_tokens.html",
        {"title": "API tokens", "tokens": visible_tokens(s, p), "done": "", "secret": secret},
    )


@router.post("/tokens/{token_id}/revoke", dependencies=[Csrf])
async def tokens_revoke(request: Request, p: Admin, token_id: int) -> Response:
    await op_revoke_token(services_of(request), p, token_id)
    return _back("/admin/tokens", "revoked")
