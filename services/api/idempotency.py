"""Creating an object at most once per client intent.

Two cases return an existing object instead of creating another:
- the request carries an `Idempotency-Key` header already used by this tenant (24 h), the usual
  contract of payment-style APIs;
- the request is an openai SDK retry (`x-stainless-retry-count` > 0, e.g. after a read timeout,
  when the first attempt may have succeeded) of a request with the same body. The SDK sends no
  idempotency key of its own, so without this a timed-out create would make two jobs.
A first request without a key always creates: identical bodies may be meant as separate jobs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from fastapi import Request
from redis import Redis

from services.api.errors import APIError

KEY_TTL_SECONDS = 24 * 3600
RETRY_TTL_SECONDS = 3600
PENDING = b"pending"


def create_once(
    redis: Redis, request: Request, tenant: str, kind: str, body: bytes, create: Callable[[], str]
) -> str:
    """Run `create` (which returns the new object's id) unless this intent already created one."""
    header = request.headers.get("idempotency-key")
    is_retry = request.headers.get("x-stainless-retry-count", "0") not in ("", "0")
    if header:
        slot, ttl = f"tunery:idem:{tenant}:{kind}:key:{_digest(header.encode())}", KEY_TTL_SECONDS
        claimed = redis.set(slot, PENDING, nx=True, ex=ttl)
    else:
        slot, ttl = f"tunery:idem:{tenant}:{kind}:body:{_digest(body)}", RETRY_TTL_SECONDS
        claimed = True
        if is_retry:
            claimed = redis.set(slot, PENDING, nx=True, ex=ttl)
        else:
            redis.set(slot, PENDING, ex=ttl)
    if not claimed:
        existing = redis.get(slot)
        if existing == PENDING:
            # 409 is what the SDK retries: the first request is still being served.
            raise APIError(
                409,
                "An identical request is still being processed; retry shortly",
                code="request_in_progress",
            )
        if existing is not None:
            return existing.decode()
        redis.set(slot, PENDING, ex=ttl)
    try:
        object_id = create()
    except BaseException:
        redis.delete(slot)
        raise
    redis.set(slot, object_id, ex=ttl)
    return object_id


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
