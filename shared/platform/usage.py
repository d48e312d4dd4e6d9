"""Usage per organization (tenant): device-seconds and cost by GPU class, kept as running totals."""

from __future__ import annotations

from redis import Redis


def _key(tenant: str) -> str:
    return f"tunery:tenant:{tenant}:usage"


def add_usage(redis: Redis, tenant: str, gpu_class: str, device_seconds: float, cost_usd: float) -> None:
    with redis.pipeline(transaction=False) as pipe:
        pipe.hincrbyfloat(_key(tenant), f"device_seconds:{gpu_class}", device_seconds)
        pipe.hincrbyfloat(_key(tenant), f"cost_usd:{gpu_class}", cost_usd)
        pipe.execute()


def tenant_usage(redis: Redis, tenant: str) -> dict:
    by_class: dict[str, dict[str, float]] = {}
    for field, value in redis.hgetall(_key(tenant)).items():
        kind, gpu_class = field.decode().split(":", 1)
        by_class.setdefault(gpu_class, {"device_seconds": 0.0, "cost_usd": 0.0})[kind] = float(value)
    return {
        "organization_id": tenant,
        "cost_usd": sum(c["cost_usd"] for c in by_class.values()),
        "device_seconds": sum(c["device_seconds"] for c in by_class.values()),
        "gpu_classes": by_class,
    }
