"""API keys: random bearer tokens, stored only as hashes, each bound to a tenant and a role.

A key looks like `tun_<id>_<secret>`; the id is public (it names the key in lists and logs), the
whole key is hashed (HMAC-SHA256 with the server secret when one is configured, else SHA-256:
either way the key's 256 random bits make a stored hash useless to an attacker).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Literal

from pydantic import BaseModel
from redis import Redis

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


ALL_KEYS = "tunery:apikeys"


class KeyStore:
    def __init__(self, redis: Redis, secret: str | None = None):
        self.redis = redis
        self.secret = secret

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
            pipe.execute()
        return record

    def authenticate(self, plain: str) -> ApiKey | None:
        key_id = self.redis.get(_hash_key(self.digest(plain)))
        if key_id is None:
            return None
        raw = self.redis.get(_record_key(key_id.decode()))
        if raw is None:
            return None
        record = ApiKey.model_validate_json(raw)
        return None if record.revoked_at is not None else record

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
            self.redis.set(_record_key(key_id), record.model_dump_json())
        return record

    def any_active(self) -> bool:
        return any(k.revoked_at is None for k in self.list())
