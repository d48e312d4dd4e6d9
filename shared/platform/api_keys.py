"""API keys: random bearer tokens, stored only as hashes, each bound to a tenant and a role.

A key looks like `tun_<id>_<secret>`; the id is public (it names the key in lists and logs), the
whole key is hashed (HMAC-SHA256 with the server secret when one is configured, else SHA-256:
either way the key's 256 random bits make a stored hash useless to an attacker).

The API remembers the keys it verified, but trusts a remembered key only while `KEYS_VERSION` still holds
the value it was verified under: every register and revoke sets a fresh value in the same transaction,
and each request reads it, so a revoked key fails on the next request. Change keys through this class only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline

from shared.platform.records import now

Role = Literal["member", "admin"]
ROLES: tuple[Role, ...] = ("member", "admin")


class ApiKey(BaseModel):
    id: str
    tenant: str
    role: Role
    name: str
    created_at: int
    revoked_at: int | None = None
    digest: str


def _hash_key(key: str) -> str:
    return f"tunery:apikey:hash:{key}"


def _record_key(key_id: str) -> str:
    return f"tunery:apikey:{key_id}"


def _rate_key(key_id: str, window: int) -> str:
    return f"tunery:rate:{key_id}:{window}"


ALL_KEYS = "tunery:apikeys"
KEYS_VERSION = "tunery:apikeys:version"
# How long, and how many, verified keys a process remembers (a bound, not the revocation mechanism).
REMEMBER_SECONDS = 60.0
REMEMBER_AT_MOST = 10_000


@dataclass(frozen=True)
class Verification:
    key: ApiKey | None  # None: an unknown or revoked key
    requests: int  # the key's requests in the rate-limit window, this one included (0 without a window)
    values: list[bytes | None]  # what `reads` named, read on the same round trip


class KeyStore:
    def __init__(self, redis: Redis, secret: str | None = None):
        self.redis = redis
        self.secret = secret
        # digest -> (KEYS_VERSION when verified, monotonic time of verification, the key)
        self._verified: dict[str, tuple[bytes, float, ApiKey]] = {}

    def digest(self, key: str) -> str:
        if self.secret:
            return hmac.new(self.secret.encode(), key.encode(), hashlib.sha256).hexdigest()
        return hashlib.sha256(key.encode()).hexdigest()

    def create(self, tenant: str, role: Role, name: str = "") -> tuple[ApiKey, str]:
        """A new key; the plain key is returned once and never stored."""
        key_id = secrets.token_hex(6)
        plain = f"tun_{key_id}_{secrets.token_urlsafe(32)}"
        return self.register(plain, key_id=key_id, tenant=tenant, role=role, name=name), plain

    def register(self, plain: str, *, key_id: str, tenant: str, role: Role, name: str) -> ApiKey:
        """Store a key under `key_id`, replacing (and so disabling) any earlier key of that id."""
        digest = self.digest(plain)
        record = ApiKey(id=key_id, tenant=tenant, role=role, name=name, created_at=now(), digest=digest)
        previous = self.get(key_id)
        with self.redis.pipeline() as pipe:
            if previous is not None and previous.digest != digest:
                pipe.delete(_hash_key(previous.digest))
            pipe.set(_record_key(key_id), record.model_dump_json())
            pipe.set(_hash_key(digest), key_id)
            pipe.sadd(ALL_KEYS, key_id)
            pipe.set(KEYS_VERSION, secrets.token_hex(8))
            pipe.execute()
        return record

    def authenticate(self, plain: str) -> ApiKey | None:
        key_id = self.redis.get(_hash_key(self.digest(plain)))
        if key_id is None:
            return None
        return _active(self.redis.get(_record_key(key_id.decode())))

    async def verify(
        self, aredis: AsyncRedis, plain: str, window: int | None, reads: Sequence[str] = ()
    ) -> Verification:
        """Check a key, count the request in the rate-limit `window` (if one) and GET `reads`: one round trip
        when this process verified the key since keys last changed (KEYS_VERSION is read with the rest)."""
        digest = self.digest(plain)
        remembered = self._verified.get(digest)
        count_now = remembered is not None and window is not None
        async with aredis.pipeline(transaction=False) as pipe:
            pipe.get(KEYS_VERSION)
            for name in reads:
                pipe.get(name)
            if count_now:
                _count(pipe, remembered[2].id, window)
            version, *replies = await pipe.execute()
        values, counted = replies[: len(reads)], replies[len(reads)] if count_now else None
        if remembered is not None:
            verified_under, verified_at, key = remembered
            if version == verified_under and time.monotonic() - verified_at < REMEMBER_SECONDS:
                return Verification(key, counted or 0, values)
        key = await self._read_active(aredis, digest)
        if key is None:
            self._verified.pop(digest, None)
            return Verification(None, 0, values)
        if version is not None:  # None: keys stored before KEYS_VERSION existed, or a wiped Redis
            if len(self._verified) >= REMEMBER_AT_MOST:
                self._verified.clear()
            self._verified[digest] = (version, time.monotonic(), key)
        if window is not None and (counted is None or remembered[2].id != key.id):
            async with aredis.pipeline(transaction=False) as pipe:
                _count(pipe, key.id, window)
                counted, _ = await pipe.execute()
        return Verification(key, counted or 0, values)

    async def _read_active(self, aredis: AsyncRedis, digest: str) -> ApiKey | None:
        key_id = await aredis.get(_hash_key(digest))
        if key_id is None:
            return None
        return _active(await aredis.get(_record_key(key_id.decode())))

    def get(self, key_id: str) -> ApiKey | None:
        raw = self.redis.get(_record_key(key_id))
        return ApiKey.model_validate_json(raw) if raw is not None else None

    def list(self, tenant: str | None = None) -> list[ApiKey]:
        ids = sorted(i.decode() for i in self.redis.smembers(ALL_KEYS))
        raws = self.redis.mget([_record_key(i) for i in ids]) if ids else []
        keys = [ApiKey.model_validate_json(r) for r in raws if r is not None]
        return sorted(
            (k for k in keys if tenant is None or k.tenant == tenant), key=lambda k: (k.created_at, k.id)
        )

    def revoke(self, key_id: str) -> ApiKey | None:
        record = self.get(key_id)
        if record is None:
            return None
        if record.revoked_at is None:
            record.revoked_at = now()
            with self.redis.pipeline() as pipe:
                pipe.set(_record_key(key_id), record.model_dump_json())
                pipe.set(KEYS_VERSION, secrets.token_hex(8))
                pipe.execute()
        return record

    def any_active(self) -> bool:
        return any(k.revoked_at is None for k in self.list())


def _active(raw: bytes | None) -> ApiKey | None:
    record = ApiKey.model_validate_json(raw) if raw is not None else None
    return None if record is None or record.revoked_at is not None else record


def _count(pipe: AsyncPipeline, key_id: str, window: int) -> None:
    """One more request of the key in the one-minute `window` (kept two minutes, then dropped)."""
    pipe.incr(_rate_key(key_id, window))
    pipe.expire(_rate_key(key_id, window), 120)
