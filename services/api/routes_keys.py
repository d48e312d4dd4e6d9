"""/v1/keys: an organization's admins list, create and revoke its API keys over HTTP (the console's Keys
page), as operators do with `tunery keys`. Admin keys only: a member key gets 403, and every key seen or
touched is of the caller's own organization (another's is a 404, as if it did not exist)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from services.api.auth import Caller, require_admin
from services.api.context import Context, get_context
from services.api.errors import APIError
from services.api.schemas import list_object
from shared.platform.api_keys import ApiKey

router = APIRouter(prefix="/v1/keys", tags=["keys"])

ADMIN_ONLY = {403: {"description": "The API key is not an admin key"}}


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="Who or what uses the key, e.g. ci-pipeline")
    role: Literal["member", "admin"] = Field(
        default="member",
        description="member: jobs, files, models, evaluations; admin: also keys and deletions",
    )


class KeyObject(BaseModel):
    id: str = Field(description="The key's public id: the part after `tun_` and before the secret")
    object: Literal["api_key"]
    name: str
    role: Literal["member", "admin"]
    organization_id: str
    created_at: int
    revoked_at: int | None
    current: bool = Field(description="Whether this is the key making the request")


class CreatedKey(KeyObject):
    key: str = Field(
        description="The whole key: shown in this answer only, never again (only a hash is kept)"
    )


class KeyList(BaseModel):
    object: Literal["list"]
    data: list[KeyObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


def key_object(key: ApiKey, caller: Caller) -> dict:
    return {
        "id": key.id,
        "object": "api_key",
        "name": key.name,
        "role": key.role,
        "organization_id": key.tenant,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "current": key.id == caller.key_id,
    }


@router.get(
    "",
    summary="List the organization's API keys (admin keys only)",
    response_model=KeyList,
    responses=ADMIN_ONLY,
)
def list_keys(ctx: Context = Depends(get_context), caller: Caller = Depends(require_admin)) -> dict:
    """Oldest first, revoked ones included (with `revoked_at`); never the keys themselves."""
    return list_object([key_object(k, caller) for k in ctx.keys.list(caller.tenant)], False)


@router.post(
    "",
    summary="Create an API key in the organization (admin keys only)",
    response_model=CreatedKey,
    responses=ADMIN_ONLY,
    description="The answer holds the whole key (`key`) once; Tunery keeps only its hash.",
)
def create_key(
    body: KeyCreate, ctx: Context = Depends(get_context), caller: Caller = Depends(require_admin)
) -> dict:
    record, plain = ctx.keys.create(caller.tenant, body.role, body.name)
    return key_object(record, caller) | {"key": plain}


@router.post(
    "/{key_id}/revoke",
    summary="Revoke an API key of the organization (admin keys only)",
    response_model=KeyObject,
    responses=ADMIN_ONLY,
    description="From now on the key is refused (401). Revoking a revoked key changes nothing. The key making "
    "the request cannot revoke itself (400): an admin would lock themselves out mid-session; use another "
    "admin key, or `tunery keys revoke`.",
)
def revoke_key(
    key_id: str, ctx: Context = Depends(get_context), caller: Caller = Depends(require_admin)
) -> dict:
    record = ctx.keys.get(key_id)
    if record is None or record.tenant != caller.tenant:
        raise APIError(404, f"No such API key: {key_id}", code="api_key_not_found", param="key_id")
    if key_id == caller.key_id:
        raise APIError(
            400, "an API key cannot revoke itself; revoke it with another admin key", code="cannot_revoke_own_key",
            param="key_id",
        )  # fmt: skip
    revoked = ctx.keys.revoke(key_id)
    if revoked is None:  # keys are revoked, never deleted: only Redis losing it gets here
        raise APIError(404, f"No such API key: {key_id}", code="api_key_not_found", param="key_id")
    return key_object(revoked, caller)
