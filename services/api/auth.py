"""Who is calling: the API key in `Authorization: Bearer`, its tenant and role, and its rate limit."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import Depends, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.api.context import Context, get_context
from services.api.errors import APIError

bearer = HTTPBearer(auto_error=False, description="A Tunery API key (`tun_…`), from `tunery keys create`.")


@dataclass(frozen=True)
class Caller:
    key_id: str
    tenant: str
    role: str


async def authenticate(
    credentials: HTTPAuthorizationCredentials | None = Security(bearer),
    ctx: Context = Depends(get_context),
) -> Caller:
    """Async on the asyncio Redis client: the check runs on the event loop, no worker thread per request."""
    caller, _ = await authenticate_reading(ctx, credentials)
    return caller


async def authenticate_reading(
    ctx: Context, credentials: HTTPAuthorizationCredentials | None, reads: Sequence[str] = ()
) -> tuple[Caller, list[bytes | None]]:
    """`authenticate`, plus GETs of the Redis keys `reads` on the same round trip, for the hottest reads.
    The values may belong to anyone: the caller must filter them by the returned tenant."""
    if credentials is None:
        raise APIError(401, "No API key: send it as `Authorization: Bearer <key>`", code="missing_api_key")
    if ctx.needs_bootstrap_key:
        await run_in_threadpool(ctx.ensure_bootstrap_key)
    limit = ctx.settings.rate_limit_per_minute
    now = time.time()
    window = int(now // 60) if limit > 0 else None
    verified = await ctx.keys.verify(ctx.aredis(), credentials.credentials, window, reads)
    key = verified.key
    if key is None:
        raise APIError(401, "Incorrect or revoked API key", code="invalid_api_key")
    if window is not None and verified.requests > limit:
        # A fixed one-minute window per key, counted in Redis so every API replica shares it.
        retry_after = max(1, int((window + 1) * 60 - now) + 1)
        raise APIError(
            429,
            f"Rate limit of {limit} requests per minute reached for this API key; retry in {retry_after} s",
            code="rate_limit_exceeded",
            headers={"retry-after": str(retry_after)},
        )
    return Caller(key_id=key.id, tenant=key.tenant, role=key.role), verified.values


async def caller_tenant(caller: Caller = Depends(authenticate)) -> str:
    """Every object lookup is filtered by this: the tenant comes from the key, never the request."""
    return caller.tenant


async def require_admin(caller: Caller = Depends(authenticate)) -> Caller:
    if caller.role != "admin":
        raise APIError(403, "This action needs an admin API key", code="insufficient_permissions")
    return caller
