"""Who is calling: the API key in `Authorization: Bearer`, its tenant and role, and its rate limit."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.api.context import Context, get_context
from services.api.errors import APIError

bearer = HTTPBearer(auto_error=False, description="A Tunery API key (`tun_…`), from `tunery keys create`.")


@dataclass(frozen=True)
class Caller:
    key_id: str
    tenant: str
    role: str


def authenticate(
    credentials: HTTPAuthorizationCredentials | None = Security(bearer),
    ctx: Context = Depends(get_context),
) -> Caller:
    if credentials is None:
        raise APIError(401, "No API key: send it as `Authorization: Bearer <key>`", code="missing_api_key")
    ctx.ensure_bootstrap_key()
    key = ctx.keys.authenticate(credentials.credentials)
    if key is None:
        raise APIError(401, "Incorrect or revoked API key", code="invalid_api_key")
    _enforce_rate_limit(ctx, key.id)
    return Caller(key_id=key.id, tenant=key.tenant, role=key.role)


def caller_tenant(caller: Caller = Depends(authenticate)) -> str:
    """Every object lookup is filtered by this: the tenant comes from the key, never the request."""
    return caller.tenant


def require_admin(caller: Caller = Depends(authenticate)) -> Caller:
    if caller.role != "admin":
        raise APIError(403, "This action needs an admin API key", code="insufficient_permissions")
    return caller


def _enforce_rate_limit(ctx: Context, key_id: str) -> None:
    """A fixed one-minute window per key, counted in Redis so every API replica shares it."""
    limit = ctx.settings.rate_limit_per_minute
    if limit <= 0:
        return
    now = time.time()
    window = int(now // 60)
    counter = f"tunery:rate:{key_id}:{window}"
    with ctx.redis.pipeline() as pipe:
        pipe.incr(counter)
        pipe.expire(counter, 120)
        count, _ = pipe.execute()
    if count > limit:
        retry_after = max(1, int((window + 1) * 60 - now) + 1)
        raise APIError(
            429,
            f"Rate limit of {limit} requests per minute reached for this API key; retry in {retry_after} s",
            code="rate_limit_exceeded",
            headers={"retry-after": str(retry_after)},
        )
