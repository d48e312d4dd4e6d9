"""What every request handler needs, built once per process at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from redis import Redis

from shared.catalog import CatalogEntry
from shared.file_store import FileStore
from shared.job_store import JobStore
from shared.records import DEFAULT_TENANT
from shared.settings import Settings
from shared.storage import Storage


@dataclass
class Context:
    settings: Settings
    redis: Redis
    storage: Storage
    files: FileStore
    jobs: JobStore
    catalog: dict[str, CatalogEntry]


def get_context(request: Request) -> Context:
    return request.app.state.context


def current_tenant() -> str:
    """The tenant of the caller. Until API keys exist every caller is the default tenant."""
    return DEFAULT_TENANT
