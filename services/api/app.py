"""The FastAPI application: OpenAI-style fine-tuning endpoints plus health and metrics."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import FrameType

from fastapi import FastAPI, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from redis.exceptions import RedisError

from services.api import (
    file_ingest,
    routes_artifacts,
    routes_evaluations,
    routes_files,
    routes_inference,
    routes_jobs,
    routes_keys,
    routes_model_fit,
    routes_models,
    routes_uploads,
    routes_usage,
)
from services.api.console import install_console
from services.api.context import Context
from services.api.errors import install_error_handlers
from services.api.middleware import LimitBodySize, ObserveLatency
from services.api.openapi import install_openapi
from shared.planning.catalog import load_catalog
from shared.planning.gpu_classes import load_gpu_classes
from shared.platform import janitor, metrics
from shared.platform.api_keys import KeyStore
from shared.platform.file_store import FileStore
from shared.platform.job_store import JobStore
from shared.platform.redis_connection import connect_redis
from shared.platform.settings import Settings, get_settings, metrics_directory
from shared.platform.storage import StorageError, storage_from_settings

log = logging.getLogger(__name__)

READINESS_SCHEMA = {
    "type": "object",
    "required": ["status", "problems"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "unavailable"]},
        "problems": {"type": "array", "items": {"type": "string"}},
    },
}


def create_app(settings: Settings, multiprocess_dir: Path | None = None) -> FastAPI:
    redis = connect_redis(settings.effective_redis_url, settings.api_redis_retry_seconds)
    storage = storage_from_settings(settings)
    context = Context(
        settings=settings,
        redis=redis,
        storage=storage,
        files=FileStore(redis),
        jobs=JobStore(redis, storage, settings.max_events_per_job),
        catalog=load_catalog(settings),
        gpu_classes=load_gpu_classes(settings.gpu_classes),
        keys=KeyStore(redis, settings.api_key_secret),
    )
    process_metrics = metrics.registry(multiprocess_dir)
    state_metrics = CollectorRegistry()
    state_metrics.register(metrics.RedisStateCollector(redis))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        try:
            context.ensure_bootstrap_key()
        except RedisError:
            log.warning("Redis is unreachable; the bootstrap API key is registered once it answers")
        janitor = asyncio.create_task(_janitor_loop(context))
        _note_stop_signals(context.stopping)
        # Files a stopped or killed API process left `uploaded` are validated again.
        context.validations.submit(file_ingest.resume_validations, context)
        yield
        janitor.cancel()
        # Validations after an answer finish first: a file left `uploaded` would wait for the next start.
        await run_in_threadpool(context.validations.shutdown)
        await context.close_aredis()
        redis.close()

    app = FastAPI(
        title="Tunery",
        version="0.1.0",
        summary="Self-hosted LLM fine-tuning with an OpenAI-compatible API.",
        lifespan=lifespan,
        # /docs is served by install_console from the package (FastAPI's loads from a CDN); no ReDoc.
        docs_url=None,
        redoc_url=None,
    )
    app.state.context = context
    install_error_handlers(app)

    # Pure ASGI; the last added runs first, so latency is observed for 413s too.
    app.add_middleware(LimitBodySize, settings=settings)
    app.add_middleware(ObserveLatency)

    @app.get("/healthz", tags=["operations"], summary="Liveness: the process answers")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Readiness: Redis and storage are reachable",
        responses={
            200: {"content": {"application/json": {"schema": READINESS_SCHEMA}}},
            503: {
                "description": "Redis or storage does not answer; `problems` says which and why",
                "content": {"application/json": {"schema": READINESS_SCHEMA}},
            },
        },
    )
    async def readyz() -> JSONResponse:
        problems = await run_in_threadpool(_check_dependencies, context)
        status = 503 if problems else 200
        return JSONResponse({"status": "unavailable" if problems else "ok", "problems": problems}, status)

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={
            200: {
                "description": "The Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    async def metrics_endpoint() -> Response:
        body = await run_in_threadpool(
            lambda: generate_latest(process_metrics) + generate_latest(state_metrics)
        )
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.include_router(routes_files.router)
    app.include_router(routes_jobs.router)
    app.include_router(routes_artifacts.router)
    app.include_router(routes_model_fit.router)  # before routes_models: its /{model_id:path} takes any path
    app.include_router(routes_models.router)
    app.include_router(routes_keys.router)
    app.include_router(routes_uploads.router)
    app.include_router(routes_usage.router)
    app.include_router(routes_inference.router)
    app.include_router(routes_evaluations.router)
    install_openapi(app)
    install_console(app)  # /docs, / and the web console (/console)

    return app


def _note_stop_signals(stopping: threading.Event) -> None:
    """Set `stopping` on SIGINT or SIGTERM before uvicorn's own handler starts its graceful shutdown, which
    waits for open connections: event streams see it and end. Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        if not callable(previous):
            continue

        def handler(number: int, frame: FrameType | None, previous: Callable = previous) -> None:
            stopping.set()
            previous(number, frame)

        signal.signal(signum, handler)


async def _janitor_loop(context: Context) -> None:
    """Every API process offers to sweep; a Redis lock lets one do it each interval. After a sweep that
    could not reach Redis, silences are counted from when it answered again."""
    reachable_since = 0.0
    while True:
        await asyncio.sleep(context.settings.janitor_interval_seconds)
        try:
            await run_in_threadpool(
                partial(janitor.sweep, reachable_since=reachable_since),
                context.settings,
                context.redis,
                context.jobs,
            )
        except RedisError as exc:
            reachable_since = time.time() + context.settings.janitor_interval_seconds
            log.warning("janitor: Redis is unreachable (%s); sweeping again once it answers", exc)
        except Exception:  # a sweep must never take the API down; the next one retries
            log.exception("janitor sweep failed")
        context.validations.submit(file_ingest.resume_validations, context)


def app_from_settings() -> FastAPI:
    """The app as `tunery api` serves it (uvicorn's factory, once per worker process)."""
    settings = get_settings()
    return create_app(settings, metrics_directory(settings, "api"))


def _check_dependencies(context: Context) -> list[str]:
    problems = []
    try:
        context.redis.ping()
    except RedisError as exc:
        problems.append(f"redis: {exc}")
    try:
        context.storage.ping()
    except StorageError as exc:
        problems.append(f"storage: {exc}")
    return problems
