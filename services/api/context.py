"""What every request handler needs, built once per process at start-up."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from shared.planning.catalog import CatalogEntry
from shared.planning.gpu_classes import GpuClass
from shared.platform.api_keys import KeyStore
from shared.platform.file_store import FileStore
from shared.platform.job_store import JobStore
from shared.platform.records import DEFAULT_TENANT
from shared.platform.redis_connection import connect_async_redis
from shared.platform.settings import Settings
from shared.platform.storage import Storage


@dataclass
class Context:
    settings: Settings
    redis: Redis
    storage: Storage
    files: FileStore
    jobs: JobStore
    catalog: dict[str, CatalogEntry]
    gpu_classes: dict[str, GpuClass]
    keys: KeyStore
    bootstrap_registered: bool = False
    # Set when the process is told to stop: open event streams end with a final event instead of holding
    # the shutdown until their clients hang up.
    stopping: threading.Event = field(default_factory=threading.Event)
    # Where files larger than TUNERY_SYNC_VALIDATION_BYTES are validated after their upload's answer
    # (services.api.file_ingest). Each thread only waits for a validation process (there are at most 4),
    # renewing its file's claim meanwhile, so waiting uploads do not let their claims lapse.
    validations: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(64, thread_name_prefix="validation")
    )
    # The asyncio client of the hot read paths, and the event loop its connections belong to.
    _aredis: AsyncRedis | None = field(default=None, repr=False)
    _aredis_loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    def aredis(self) -> AsyncRedis:
        """The asyncio Redis client for the running event loop. uvicorn runs one loop per process; a test
        client may run a loop per request, and a connection must not outlive its loop."""
        loop = asyncio.get_running_loop()
        if self._aredis is None or self._aredis_loop is not loop:
            self._aredis = connect_async_redis(
                self.settings.effective_redis_url, self.settings.api_redis_retry_seconds
            )
            self._aredis_loop = loop
        return self._aredis

    async def close_aredis(self) -> None:
        """Close the client if it belongs to the running loop (one of another loop is only dropped)."""
        if self._aredis is not None and self._aredis_loop is asyncio.get_running_loop():
            await self._aredis.aclose()
        self._aredis = self._aredis_loop = None

    @property
    def needs_bootstrap_key(self) -> bool:
        return not self.bootstrap_registered and bool(self.settings.bootstrap_api_key)

    def ensure_bootstrap_key(self) -> None:
        """Register TUNERY_BOOTSTRAP_API_KEY once Redis answers (the API may start before Redis)."""
        if not self.needs_bootstrap_key:
            return
        self.keys.register(
            self.settings.bootstrap_api_key,
            key_id="bootstrap",
            tenant=DEFAULT_TENANT,
            role="admin",
            name="bootstrap",
        )
        self.bootstrap_registered = True


async def get_context(request: Request) -> Context:
    """Async, so that FastAPI calls it on the event loop rather than in a worker thread."""
    return request.app.state.context
