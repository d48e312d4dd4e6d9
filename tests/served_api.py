"""The API served by uvicorn on a real socket (concurrent clients, external tools), in this process."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.api_fixtures import ADMIN_KEY
from tests.helpers import free_port


@pytest.fixture
def served_app(api_settings, s3_server, bucket_storage) -> Iterator[str]:
    """The app served by uvicorn on a free port, on the test Redis and a bucket of the moto S3 server, with
    no rate limit (tests send bursts) and short waits for workers; its base URL."""
    import uvicorn

    from services.api.app import create_app

    settings = api_settings.model_copy(
        update={
            "s3_bucket": bucket_storage.bucket,
            "s3_endpoint_url": s3_server.endpoint_url,
            "s3_access_key_id": s3_server.access_key_id,
            "s3_secret_access_key": s3_server.secret_access_key,
            "rate_limit_per_minute": 0,
            # No worker runs beside it: requests that wait for one answer 503 within seconds.
            "estimate_timeout_seconds": 2.0,
            "inference_timeout_seconds": 2.0,
        }
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped while starting"
            thread.join(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def client(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=120, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
