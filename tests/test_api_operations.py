"""Health, readiness and metrics of the API."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from services.api.app import create_app
from tests.api_fixtures import ADMIN_KEY
from tests.helpers import free_port


def test_ready_when_redis_and_storage_answer(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    response = api.get("/readyz")
    assert response.status_code == 200


def test_not_ready_while_redis_is_unreachable(api_settings):
    settings = api_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["problems"][0].startswith("redis:")
        assert client.get("/healthz").status_code == 200
        listed = client.get("/v1/files")
        assert listed.status_code == 503
        assert listed.json()["error"]["code"] == "redis_unavailable"


def test_metrics_show_jobs_by_state_and_request_latency(api):
    api.get("/v1/files")
    families = {f.name: f for f in text_string_to_metric_families(api.get("/metrics").text)}
    states = {s.labels["state"] for s in families["tunery_jobs"].samples}
    assert {"queued", "running", "succeeded", "failed"} <= states
    latency = families["tunery_http_request_duration_seconds"]
    assert any(s.labels.get("route") == "/v1/files" for s in latency.samples)
