"""What every request handler needs, built once per process at start-up."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from fastapi import Request
from redis import Redis

from shared.planning.catalog import CatalogEntry
from shared.planning.gpu_classes import GpuClass
from shared.platform.api_keys import KeyStore
from shared.platform.file_store import FileStore
from shared.platform.job_store import JobStore
from shared.platform.records import DEFAULT_TENANT
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

    def ensure_bootstrap_key(self) -> None:
        """Register TUNERY_BOOTSTRAP_API_KEY once Redis answers (the API may start before Redis)."""
        if self.bootstrap_registered or not self.settings.bootstrap_api_key:
            return
        self.keys.register(
            self.settings.bootstrap_api_key,
            key_id="bootstrap",
            tenant=DEFAULT_TENANT,
            role="admin",
            name="bootstrap",
        )
        self.bootstrap_registered = True


def get_context(request: Request) -> Context:
    return request.app.state.context
