"""No request waits for Redis or storage on the API's event loop, where every other request would wait too:
handlers either use the asyncio Redis client or run in a worker thread."""

from __future__ import annotations

import asyncio

import pytest
import redis.client

from shared.platform.storage import LocalStorage
from tests.api_fixtures import chat_lines

BLOCKING_CALLS = [
    (redis.client.Redis, "execute_command"),
    (redis.client.Pipeline, "execute"),
    (redis.client.Pipeline, "immediate_execute_command"),
    *(
        (LocalStorage, name)
        for name in (
            "put_stream",
            "get_bytes",
            "exists",
            "size",
            "delete",
            "delete_prefix",
            "list_keys",
            "ping",
        )
    ),
]


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.fixture
def loop_calls(api, monkeypatch) -> list[str]:
    """The blocking Redis and storage calls made on an event loop once the API has started."""
    calls: list[str] = []
    for owner, name in BLOCKING_CALLS:

        def guarded(self, *args, _original=getattr(owner, name), _name=f"{owner.__name__}.{name}", **kwargs):
            if _on_event_loop():
                calls.append(f"{_name}{args[:1]}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, guarded)
    return calls


def test_no_endpoint_waits_for_redis_or_storage_on_the_event_loop(api, loop_calls):
    file = api.post("/v1/files", files={"file": ("t.jsonl", chat_lines(20))}, data={"purpose": "fine-tune"})
    file_id = file.json()["id"]
    for path in ("/v1/files", f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        assert api.get(path).status_code == 200, path
    job = api.post("/v1/fine_tuning/jobs", json={"model": "tunery/tiny-chat", "training_file": file_id})
    job_id = job.json()["id"]
    for path in (
        "/v1/fine_tuning/jobs",
        f"/v1/fine_tuning/jobs/{job_id}",
        f"/v1/fine_tuning/jobs/{job_id}/events",
    ):
        assert api.get(path).status_code == 200, path
    assert api.get("/v1/fine_tuning/jobs/ftjob-missing").status_code == 404
    assert api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
    assert "event: end" in api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"}).text

    data = chat_lines(20)
    upload = api.post(
        "/v1/uploads",
        json={"filename": "u.jsonl", "purpose": "fine-tune", "bytes": len(data), "mime_type": "text/jsonl"},
    ).json()
    part = api.post(f"/v1/uploads/{upload['id']}/parts", files={"data": ("p", data)}).json()
    completed = api.post(f"/v1/uploads/{upload['id']}/complete", json={"part_ids": [part["id"]]})
    assert completed.json()["status"] == "completed"

    for path in ("/v1/models", "/healthz", "/readyz", "/metrics"):
        assert api.get(path).status_code == 200, path
    assert loop_calls == []
