"""The connections a task needs (Redis, storage, the job store), made the same way in every worker."""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

from shared.platform.job_store import JobStore
from shared.platform.redis_connection import connect_redis
from shared.platform.settings import Settings, get_settings
from shared.platform.storage import Storage, storage_from_settings


@dataclass
class Runtime:
    settings: Settings
    redis: Redis
    storage: Storage
    jobs: JobStore


def connect(settings: Settings | None = None) -> Runtime:
    settings = settings or get_settings()
    redis = connect_redis(settings.effective_redis_url, settings.redis_outage_seconds)
    storage = storage_from_settings(settings)
    return Runtime(settings, redis, storage, JobStore(redis, storage, settings.max_events_per_job))
