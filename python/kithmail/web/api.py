"""The JSON API under /api/v1, for scripts and provisioning: the user's half.

Everything the user's pages do, as JSON, described by the OpenAPI document
at /api/v1/openapi.json. Authenticated by the session cookie (state changes
then need ``X-CSRF-Token``) or by ``Authorization: Bearer <API token>``;
the isolation rules are the pages': a principal reaches only the mail and
community of users it may see (`kithmail.web.auth.may_see_user`), whatever
ids or addresses a URL or a body names. Errors are
``{"error": code, "detail": text}`` with a 4xx status.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from kithmail.web.auth import Principal, principal

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["user"])

User = Annotated[Principal, Depends(principal)]


class Me(BaseModel):
    """Who the request acts for."""

    address: str
    tenant: str
    role: str
    via: str


@router.get("/me", response_model=Me, summary="Who am I")
async def me(p: User) -> Me:
    return Me(address=p.address, tenant=p.tenant, role=p.role, via=p.via)
