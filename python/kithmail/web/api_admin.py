"""The admin half of the JSON API, under /api/v1/admin: what the admin pages do, for scripts.

Tenants, policy (each value with where it comes from), users, the
organisation's community, held mail across a tenant, the dashboard's
figures, the audit log and API tokens — described by the OpenAPI document
at /api/v1/openapi.json. Authenticated by a session (state changes then
need ``X-CSRF-Token``) or by ``Authorization: Bearer <API token>``; a
token acts as the admin who created it, with exactly that admin's scope.

The rules are the pages' because the code is: every route calls the
operations of `kithmail.web.admin`, which scope everything by the
principal (a tenant admin naming another tenant gets 403, another
tenant's user 404 as for none). Errors are ``{"error": code, "detail":
text}`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from kithmail import db
from kithmail.web import admin as ops
from kithmail.web.auth import Principal, global_admin, services_of, tenant_admin
from kithmail.web.errors import ApiError
from kithmail.web.security import csrf

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/admin", tags=["admin"])

Admin = Annotated[Principal, Depends(tenant_admin)]
Global = Annotated[Principal, Depends(global_admin)]
Csrf = Depends(csrf)

TenantParam = Annotated[
    str | None,
    Query(
        max_length=65,
        description="A tenant's name. Tenant admins: their own (the default); global admins: "
        "any, or none for every tenant (for policy: the global overrides).",
    ),
]
AddressPath = Annotated[str, Path(max_length=320, description="A user's mail address")]
Filter = Annotated[str, Query(max_length=200)]
MAX_INT = 2**62  # SQLite's integers are 64-bit: a bigger number is refused, not stored


# ---------------------------------------------------------------- models


class UserOut(BaseModel):
    address: str
    tenant: str
    role: Literal["user", "tenant_admin", "global_admin"]
    disabled: bool
    created: int
    password_changed: int


def _user(u: db.User) -> UserOut:
    return UserOut(
        address=u.address,
        tenant=u.tenant,
        role=u.role,
        disabled=u.disabled,
        created=u.created,
        password_changed=u.password_changed,
    )


class UserIn(BaseModel):
    address: str = Field(max_length=320)
    role: Literal["user", "tenant_admin", "global_admin"] = "user"
    password: str | None = Field(
        None, min_length=8, max_length=1024, description="None: one is generated and returned"
    )


class UserCreated(BaseModel):
    user: UserOut
    password: str | None = Field(description="The generated password, shown this once")


class UserChange(BaseModel):
    disabled: bool | None = None
    role: Literal["user", "tenant_admin", "global_admin"] | None = None


class PasswordOut(BaseModel):
    user: UserOut
    password: str = Field(description="The new password, shown this once")


class TenantOut(BaseModel):
    name: str
    domains: list[str]
    users: int
    created: int
    admins: list[str]


class TenantIn(BaseModel):
    name: str = Field(max_length=64)


class AdminIn(BaseModel):
    address: str = Field(max_length=320)


class PolicyOut(BaseModel):
    key: str
    section: str
    kind: str
    choices: list[str]
    description: str
    tenant_may_override: bool
    value: Any
    origin: Literal["built-in", "file", "global", "tenant"]
    replaces: Any
    replaces_origin: Literal["built-in", "file", "global", "tenant"] | None
    overridden_here: bool


class PolicyIn(BaseModel):
    value: Any = Field(
        description="As the config file writes it: a string, number, bool or list of strings"
    )


class TenantDetail(BaseModel):
    tenant: TenantOut
    overrides: list[PolicyOut] = Field(
        description="The tenant's overrides, each beside the value it replaces"
    )


class EntryOut(BaseModel):
    entry: str
    kind: str
    source: str
    added: int


class EntryIn(BaseModel):
    entry: str = Field(max_length=512, description="An address, @domain or list:<List-Id>")
    kind: Literal["allow", "block"] = "allow"


class HeldOut(BaseModel):
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


class HeldPage(BaseModel):
    items: list[HeldOut]
    total: int
    limit: int
    offset: int


class AuditOut(BaseModel):
    id: int
    at: int
    actor: str
    tenant: str
    action: str
    target: str
    detail: str


class TokenOut(BaseModel):
    id: int
    name: str
    address: str
    created: int
    last_used: int
    expires_at: int


class TokenIn(BaseModel):
    name: str = Field(max_length=100)
    days: int | None = Field(None, ge=1, le=3650, description="None: until revoked")


class TokenCreated(BaseModel):
    secret: str = Field(description="The token, shown this once: send it as a Bearer token")


class SourceOut(BaseModel):
    source: str
    n: int


class DashboardOut(BaseModel):
    tenant: str | None
    today: str
    days: list[str]
    today_by_layer: dict[str, dict[str, int]]
    week_by_layer: dict[str, dict[str, int]]
    week_shadow_by_layer: dict[str, dict[str, int]]
    today_outcomes: dict[str, int]
    week_outcomes: dict[str, int]
    per_day: dict[str, dict[str, int]]
    top_deferred_sources: list[SourceOut]
    top_rejected_sources: list[SourceOut]
    queue_messages: int | None
    held: int
    today_by_tenant: dict[str, dict[str, int]] = Field(
        description="The whole gateway's view: tenant ('' for none) -> outcome -> recipients"
    )


def _tenant_out(s: Any, t: db.Tenant) -> TenantOut:
    admins = [u.address for u in s.database.users(t.name) if u.role == "tenant_admin"]
    return TenantOut(
        name=t.name, domains=list(t.domains), users=t.users, created=t.created, admins=admins
    )


def _policy(r: ops.PolicyRow) -> PolicyOut:
    return PolicyOut(**r.as_json())


# ---------------------------------------------------------------- dashboard


@router.get("/dashboard", response_model=DashboardOut, summary="Today's and this week's figures")
async def dashboard(request: Request, p: Admin, tenant: TenantParam = None) -> DashboardOut:
    d = await ops.dashboard_of(request, p, tenant)
    return DashboardOut(**d.as_json())


# ---------------------------------------------------------------- tenants


@router.get("/tenants", response_model=list[TenantOut], summary="Every tenant (global admins)")
async def tenants(request: Request, p: Global) -> list[TenantOut]:
    s = services_of(request)
    return [_tenant_out(s, t) for t in s.database.tenants()]


@router.post(
    "/tenants",
    response_model=TenantOut,
    status_code=201,
    dependencies=[Csrf],
    summary="Create a tenant (global admins)",
)
async def tenant_add(request: Request, p: Global, body: TenantIn) -> TenantOut:
    s = services_of(request)
    return _tenant_out(s, await ops.op_add_tenant(s, p, body.name))


@router.get(
    "/tenants/{name}",
    response_model=TenantDetail,
    summary="A tenant, with its overrides beside what they replace",
)
async def tenant(
    request: Request, p: Admin, name: Annotated[str, Path(max_length=65)]
) -> TenantDetail:
    s = services_of(request)
    t = ops.tenant_or_404(s.database, ops.existing_tenant(p, name))
    rows = ops.policy_rows(s, p, t.name)
    return TenantDetail(
        tenant=_tenant_out(s, t), overrides=[_policy(r) for r in rows if r.origin == "tenant"]
    )


@router.put(
    "/tenants/{name}/domains/{domain}",
    response_model=TenantOut,
    dependencies=[Csrf],
    summary="Give a local domain, with its users, to the tenant (global admins)",
)
async def tenant_domain(
    request: Request,
    p: Global,
    name: Annotated[str, Path(max_length=65)],
    domain: Annotated[str, Path(max_length=256)],
) -> TenantOut:
    s = services_of(request)
    return _tenant_out(s, await ops.op_move_domain(s, p, name, domain))


@router.post(
    "/tenants/{name}/admins",
    response_model=UserOut,
    dependencies=[Csrf],
    summary="Make a user of the tenant one of its admins (global admins)",
)
async def tenant_appoint(
    request: Request, p: Global, name: Annotated[str, Path(max_length=65)], body: AdminIn
) -> UserOut:
    return _user(await ops.op_appoint(services_of(request), p, name, body.address))


# ---------------------------------------------------------------- policy


@router.get(
    "/policy",
    response_model=list[PolicyOut],
    summary="Every key this admin may change, its value in force and where it comes from",
)
async def policy(request: Request, p: Admin, tenant: TenantParam = None) -> list[PolicyOut]:
    s = services_of(request)
    scope = ops.policy_scope(p, tenant)
    return [_policy(r) for r in await asyncio.to_thread(ops.policy_rows, s, p, scope)]


@router.put(
    "/policy/{key}",
    response_model=PolicyOut,
    dependencies=[Csrf],
    summary="Override one key (validated as the config file is; applies without a restart)",
)
async def policy_set(
    request: Request,
    p: Admin,
    key: Annotated[str, Path(max_length=200)],
    body: PolicyIn,
    tenant: TenantParam = None,
) -> PolicyOut:
    s = services_of(request)
    scope = ops.policy_scope(p, tenant)
    await ops.op_set_policy(s, p, scope, key, body.value)
    return _one(s, p, scope, key)


@router.delete(
    "/policy/{key}",
    response_model=PolicyOut,
    dependencies=[Csrf],
    summary="Remove one override: the weaker value applies again",
)
async def policy_unset(
    request: Request,
    p: Admin,
    key: Annotated[str, Path(max_length=200)],
    tenant: TenantParam = None,
) -> PolicyOut:
    s = services_of(request)
    scope = ops.policy_scope(p, tenant)
    await ops.op_unset_policy(s, p, scope, key)
    return _one(s, p, scope, key)


def _one(s: Any, p: Principal, scope: str, key: str) -> PolicyOut:
    for r in ops.policy_rows(s, p, scope):
        if r.key == key:
            return _policy(r)
    raise ApiError(404, "not_found", f"no key `{key[:200]}` here")


# ---------------------------------------------------------------- users


@router.get("/users", response_model=list[UserOut], summary="Users this admin manages, by address")
async def users(
    request: Request,
    p: Admin,
    tenant: TenantParam = None,
    q: Filter = "",
    role: Annotated[Literal["", "user", "tenant_admin", "global_admin"], Query()] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[UserOut]:
    s = services_of(request)
    found = await asyncio.to_thread(ops.list_users, s, p, tenant, q, role)
    return [_user(u) for u in found[offset : offset + limit]]


@router.post(
    "/users",
    response_model=UserCreated,
    status_code=201,
    dependencies=[Csrf],
    summary="Add a user of a domain this admin manages",
)
async def user_add(request: Request, p: Admin, body: UserIn) -> UserCreated:
    user, secret = await ops.op_add_user(
        services_of(request), p, body.address, body.role, body.password
    )
    return UserCreated(user=_user(user), password=None if body.password else secret)


@router.get("/users/{address}", response_model=UserOut, summary="One user")
async def user(request: Request, p: Admin, address: AddressPath) -> UserOut:
    return _user(ops.managed_user(services_of(request), p, address))


@router.patch(
    "/users/{address}",
    response_model=UserOut,
    dependencies=[Csrf],
    summary="Disable or enable a user, or change their role",
)
async def user_change(
    request: Request, p: Admin, address: AddressPath, body: UserChange
) -> UserOut:
    s = services_of(request)
    u = ops.managed_user(s, p, address)
    if body.disabled is not None:
        u = await ops.op_set_disabled(s, p, u.address, body.disabled)
    if body.role is not None:
        u = await ops.op_set_role(s, p, u.address, body.role)
    return _user(u)


@router.post(
    "/users/{address}/password",
    response_model=PasswordOut,
    dependencies=[Csrf],
    summary="Reset a user's password to a new random one (their sessions end)",
)
async def user_password(request: Request, p: Admin, address: AddressPath) -> PasswordOut:
    u, secret = await ops.op_reset_password(services_of(request), p, address)
    return PasswordOut(user=_user(u), password=secret)


# ---------------------------------------------------------------- the organisation's community


@router.get("/community", response_model=list[EntryOut], summary="The organisation's community (*)")
async def community(request: Request, p: Admin, tenant: TenantParam = None) -> list[EntryOut]:
    s = services_of(request)
    name = ops.one_tenant(s, p, tenant)
    return [EntryOut(**vars_of(e)) for e in ops.org_entries(s, p, name)]


def vars_of(e: ops.OrgEntry) -> dict[str, Any]:
    return {"entry": e.entry, "kind": e.kind, "source": e.source, "added": e.added}


@router.post(
    "/community",
    response_model=EntryOut,
    status_code=201,
    dependencies=[Csrf],
    summary="Allow or block a sender for the whole organisation",
)
async def community_add(
    request: Request, p: Admin, body: EntryIn, tenant: TenantParam = None
) -> EntryOut:
    s = services_of(request)
    name = ops.one_tenant(s, p, tenant)
    folded = await ops.op_org_add(s, p, name, body.entry, body.kind)
    for e in ops.org_entries(s, p, name):
        if e.entry == folded:
            return EntryOut(**vars_of(e))
    raise ApiError(409, "conflict", "the entry did not stick; try again")


@router.delete(
    "/community",
    status_code=204,
    dependencies=[Csrf],
    summary="Remove an entry from the organisation's community",
)
async def community_remove(
    request: Request,
    p: Admin,
    entry: Annotated[str, Query(max_length=512)],
    tenant: TenantParam = None,
) -> Response:
    s = services_of(request)
    name = ops.one_tenant(s, p, tenant)
    await ops.op_org_remove(s, p, name, entry)
    return Response(status_code=204)


# ---------------------------------------------------------------- held mail


@router.get(
    "/quarantine",
    response_model=HeldPage,
    summary="Held mail across the tenant (any user's), newest first",
)
async def quarantine(
    request: Request,
    p: Admin,
    tenant: TenantParam = None,
    user: Filter = "",
    sender: Filter = "",
    reason: Filter = "",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> HeldPage:
    s = services_of(request)
    rows, total = await asyncio.to_thread(
        ops.held_rows,
        s,
        p,
        tenant,
        user=user,
        sender=sender,
        reason=reason,
        limit=limit,
        offset=offset,
    )
    return HeldPage(
        items=[HeldOut(**r.as_json()) for r in rows], total=total, limit=limit, offset=offset
    )


# ---------------------------------------------------------------- the audit log


@router.get("/audit", response_model=list[AuditOut], summary="The audit log, newest first")
async def audit(
    request: Request,
    p: Admin,
    tenant: TenantParam = None,
    actor: Filter = "",
    action: Annotated[str, Query(max_length=200, description="A prefix: policy.")] = "",
    target: Filter = "",
    since: Annotated[int | None, Query(ge=0, le=MAX_INT, description="Unix seconds, from")] = None,
    until: Annotated[
        int | None, Query(ge=0, le=MAX_INT, description="Unix seconds, before")
    ] = None,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_INT, description="Entries older than this id")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[AuditOut]:
    s = services_of(request)
    rows = await asyncio.to_thread(
        ops.audit_rows,
        s,
        p,
        tenant,
        actor=actor,
        action=action,
        target=target,
        since=since,
        until=until,
        before=before,
        limit=limit,
    )
    return [AuditOut(**r.as_json()) for r in rows]


# ---------------------------------------------------------------- API tokens


@router.get("/tokens", response_model=list[TokenOut], summary="API tokens (never their secrets)")
async def tokens(request: Request, p: Admin) -> list[TokenOut]:
    return [
        TokenOut(
            id=t.id,
            name=t.name,
            address=t.address,
            created=t.created,
            last_used=t.last_used,
            expires_at=t.expires_at,
        )
        for t in ops.visible_tokens(services_of(request), p)
    ]


@router.post(
    "/tokens",
    response_model=TokenCreated,
    status_code=201,
    dependencies=[Csrf],
    summary="Create a token acting as you, with your rights",
)
async def token_create(request: Request, p: Admin, body: TokenIn) -> TokenCreated:
    return TokenCreated(
        secret=await ops.op_create_token(services_of(request), p, body.name, body.days)
    )


@router.delete("/tokens/{token_id}", status_code=204, dependencies=[Csrf], summary="Revoke a token")
async def token_revoke(
    request: Request, p: Admin, token_id: Annotated[int, Path(ge=1, le=2**62)]
) -> Response:
    await ops.op_revoke_token(services_of(request), p, token_id)
    return Response(status_code=204)
