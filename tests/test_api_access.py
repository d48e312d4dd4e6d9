"""Access: API keys, roles, tenants, limits and idempotency, on the real test Redis."""

from __future__ import annotations

import json

import pytest
import redis
from fastapi.testclient import TestClient

from services.api.app import create_app
from shared.platform.api_keys import KeyStore
from shared.platform.job_store import JobStore
from shared.platform.records import fine_tuned_model_id
from shared.platform.storage import LocalStorage
from tests.api_fixtures import chat_lines, prepared


def upload(client, n: int = 20) -> str:
    response = client.post(
        "/v1/files", files={"file": ("t.jsonl", chat_lines(n))}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def create_job(client, file_id: str, **extra):
    return client.post(
        "/v1/fine_tuning/jobs", json={"model": "tunery/tiny-chat", "training_file": file_id, **extra}
    )


@pytest.fixture
def keys(redis_url) -> KeyStore:
    return KeyStore(redis.Redis.from_url(redis_url))


@pytest.fixture
def other_tenant(api, keys):
    """A client of another organization on the same server."""
    _, plain = keys.create("org-b", "admin", "other")
    return TestClient(api.app, headers={"Authorization": f"Bearer {plain}"})


def test_a_request_without_a_key_gets_401_in_openai_shape(api):
    response = TestClient(api.app).get("/v1/files")
    assert response.status_code == 401
    assert response.json()["error"] == {
        "message": "No API key: send it as `Authorization: Bearer <key>`",
        "type": "authentication_error",
        "param": None,
        "code": "missing_api_key",
    }


def test_a_wrong_or_revoked_key_gets_401(api, keys):
    record, plain = keys.create("org-default", "member")
    client = TestClient(api.app, headers={"Authorization": f"Bearer {plain}"})
    assert client.get("/v1/files").status_code == 200
    keys.revoke(record.id)
    assert client.get("/v1/files").status_code == 401
    wrong = TestClient(api.app, headers={"Authorization": "Bearer tun_nope_nope"}).get("/v1/files")
    assert wrong.json()["error"]["code"] == "invalid_api_key"


def test_a_key_replaced_under_its_id_stops_working_at_once(api, keys):
    keys.register("tun_ci_first", key_id="ci", tenant="org-default", role="member", name="ci")
    first = TestClient(api.app, headers={"Authorization": "Bearer tun_ci_first"})
    assert first.get("/v1/fine_tuning/jobs/ftjob-x").status_code == 404
    keys.register("tun_ci_second", key_id="ci", tenant="org-default", role="member", name="ci")
    assert first.get("/v1/fine_tuning/jobs/ftjob-x").status_code == 401
    second = TestClient(api.app, headers={"Authorization": "Bearer tun_ci_second"})
    assert second.get("/v1/fine_tuning/jobs/ftjob-x").status_code == 404


def test_a_key_known_before_redis_lost_its_data_is_refused(api, keys, redis_url):
    _, plain = keys.create("org-default", "member")
    client = TestClient(api.app, headers={"Authorization": f"Bearer {plain}"})
    assert client.get("/v1/fine_tuning/jobs/ftjob-x").status_code == 404
    redis.Redis.from_url(redis_url).flushdb()
    assert client.get("/v1/fine_tuning/jobs/ftjob-x").status_code == 401


def test_keys_are_stored_only_as_hashes(keys, redis_url):
    _, plain = keys.create("org-default", "member")
    client = redis.Redis.from_url(redis_url)
    stored = b"".join(client.dump(k) or b"" for k in client.keys("tunery:apikey*"))
    assert plain.encode() not in stored
    assert plain.split("_", 2)[2].encode() not in stored  # the secret (it may itself hold "_")


def test_a_member_key_cannot_delete_a_model(api, keys):
    _, plain = keys.create("org-default", "member")
    response = TestClient(api.app, headers={"Authorization": f"Bearer {plain}"}).delete("/v1/models/ft:x")
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"


def test_an_admin_deletes_a_fine_tuned_model_and_its_adapter(api, api_settings, redis_url):
    job_id = create_job(api, upload(api), suffix="demo").json()["id"]
    store = JobStore(redis.Redis.from_url(redis_url), LocalStorage(api_settings.resolved_storage_path))
    record = store.require(job_id)
    record.fine_tuned_model = fine_tuned_model_id(record)
    store.register_fine_tuned_model(record)
    adapter_key = f"tenants/org-default/jobs/{job_id}/artifacts/adapter/adapter_model.safetensors"
    store.storage.put_bytes(adapter_key, b"weights")
    model_id = record.fine_tuned_model
    assert model_id in [m["id"] for m in api.get("/v1/models").json()["data"]]
    deleted = api.delete(f"/v1/models/{model_id}").json()
    assert deleted == {"id": model_id, "object": "model", "deleted": True}
    assert model_id not in [m["id"] for m in api.get("/v1/models").json()["data"]]
    assert not store.storage.exists(adapter_key)
    assert api.delete("/v1/models/tunery/tiny-chat").status_code == 400


def test_the_rate_limit_answers_429_with_retry_after(api_settings, redis_url):
    settings = api_settings.model_copy(update={"rate_limit_per_minute": 3})
    with TestClient(
        create_app(settings), headers={"Authorization": f"Bearer {settings.bootstrap_api_key}"}
    ) as c:
        statuses = [c.get("/v1/files").status_code for _ in range(4)]
        limited = c.get("/v1/files")
    assert statuses == [200, 200, 200, 429]
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["retry-after"]) <= 61


def test_an_oversized_json_body_is_refused_with_413(api_settings):
    settings = api_settings.model_copy(update={"max_json_bytes": 100})
    with TestClient(
        create_app(settings), headers={"Authorization": f"Bearer {settings.bootstrap_api_key}"}
    ) as c:
        response = c.post("/v1/fine_tuning/jobs", json={"model": "x" * 200, "training_file": "f"})
    assert response.status_code == 413
    assert "TUNERY_MAX_JSON_BYTES" in response.json()["error"]["message"]


def test_an_oversized_upload_is_refused_with_413(api_settings):
    settings = api_settings.model_copy(update={"max_upload_bytes": 1000})
    with TestClient(
        create_app(settings), headers={"Authorization": f"Bearer {settings.bootstrap_api_key}"}
    ) as c:
        response = c.post(
            "/v1/files", files={"file": ("t.jsonl", b"x" * 100_000)}, data={"purpose": "fine-tune"}
        )
        assert response.status_code == 413
        assert c.get("/v1/files").json()["data"] == []


def test_active_jobs_per_tenant_are_capped(api_settings):
    settings = api_settings.model_copy(update={"max_active_jobs_per_tenant": 2})
    with TestClient(
        create_app(settings), headers={"Authorization": f"Bearer {settings.bootstrap_api_key}"}
    ) as c:
        file_id = upload(c)
        first = create_job(c, file_id).json()["id"]
        create_job(c, file_id)
        refused = create_job(c, file_id)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_active_jobs"
        c.post(f"/v1/fine_tuning/jobs/{first}/cancel")
        assert create_job(c, file_id).status_code == 200


def test_an_idempotency_key_replay_returns_the_first_job(api):
    file_id = upload(api)
    headers = {"Idempotency-Key": "create-42"}
    body = {"model": "tunery/tiny-chat", "training_file": file_id}
    first = api.post("/v1/fine_tuning/jobs", json=body, headers=headers).json()
    again = api.post("/v1/fine_tuning/jobs", json=body, headers=headers).json()
    assert again["id"] == first["id"]
    assert len(api.get("/v1/fine_tuning/jobs").json()["data"]) == 1


def test_an_sdk_retry_of_the_same_create_returns_the_first_job(api):
    file_id = upload(api)
    body = json.dumps({"model": "tunery/tiny-chat", "training_file": file_id})
    headers = {"content-type": "application/json"}
    first = api.post(
        "/v1/fine_tuning/jobs", content=body, headers={**headers, "x-stainless-retry-count": "0"}
    )
    retry = api.post(
        "/v1/fine_tuning/jobs", content=body, headers={**headers, "x-stainless-retry-count": "1"}
    )
    assert retry.json()["id"] == first.json()["id"]
    # A new request (not a retry) with the same body is a new job.
    fresh = api.post(
        "/v1/fine_tuning/jobs", content=body, headers={**headers, "x-stainless-retry-count": "0"}
    )
    assert fresh.json()["id"] != first.json()["id"]


def test_pause_and_resume_a_queued_job(api, api_settings):
    job_id = create_job(api, upload(api)).json()["id"]
    prepared(api, api_settings, job_id)
    paused = api.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()
    assert (paused["status"], paused["stage"]) == ("queued", "paused")
    resumed = api.post(f"/v1/fine_tuning/jobs/{job_id}/resume").json()
    assert (resumed["status"], resumed["stage"], resumed["attempt"]) == ("queued", "queued", 1)
    assert api.post(f"/v1/fine_tuning/jobs/{job_id}/resume").json()["error"]["code"] == "job_not_paused"


def test_jobs_list_filters_by_metadata(api):
    file_id = upload(api)
    team_a = create_job(api, file_id, metadata={"team": "a"}).json()["id"]
    create_job(api, file_id, metadata={"team": "b"})
    listed = api.get("/v1/fine_tuning/jobs", params={"metadata[team]": "a"}).json()["data"]
    assert [j["id"] for j in listed] == [team_a]


# -- tenants: another organization's ids answer 404 everywhere, and lists never show them ------------


def test_other_tenants_files_are_invisible(api, other_tenant):
    file_id = upload(api)
    for method, path in [
        ("get", f"/v1/files/{file_id}"),
        ("get", f"/v1/files/{file_id}/content"),
        ("delete", f"/v1/files/{file_id}"),
    ]:
        assert getattr(other_tenant, method)(path).status_code == 404, path
    assert other_tenant.get("/v1/files").json()["data"] == []
    assert api.get(f"/v1/files/{file_id}").status_code == 200


def test_other_tenants_jobs_are_invisible(api, other_tenant):
    job_id = create_job(api, upload(api)).json()["id"]
    for method, path in [
        ("get", f"/v1/fine_tuning/jobs/{job_id}"),
        ("post", f"/v1/fine_tuning/jobs/{job_id}/cancel"),
        ("post", f"/v1/fine_tuning/jobs/{job_id}/pause"),
        ("post", f"/v1/fine_tuning/jobs/{job_id}/resume"),
        ("get", f"/v1/fine_tuning/jobs/{job_id}/events"),
        ("get", f"/v1/fine_tuning/jobs/{job_id}/checkpoints"),
    ]:
        assert getattr(other_tenant, method)(path).status_code == 404, path
    assert other_tenant.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "validating_files"


def test_another_tenants_file_cannot_be_trained_on(api, other_tenant):
    response = create_job(other_tenant, upload(api))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "file_not_found"


def test_other_tenants_fine_tuned_models_are_invisible(api, other_tenant, api_settings, redis_url):
    job_id = create_job(api, upload(api)).json()["id"]
    store = JobStore(redis.Redis.from_url(redis_url), LocalStorage(api_settings.resolved_storage_path))
    record = store.require(job_id)
    record.fine_tuned_model = fine_tuned_model_id(record)
    store.register_fine_tuned_model(record)
    assert other_tenant.get(f"/v1/models/{record.fine_tuned_model}").status_code == 404
    assert other_tenant.delete(f"/v1/models/{record.fine_tuned_model}").status_code == 404
    assert record.fine_tuned_model not in [m["id"] for m in other_tenant.get("/v1/models").json()["data"]]
    assert api.get(f"/v1/models/{record.fine_tuned_model}").status_code == 200


def test_other_tenants_uploads_are_invisible(api, other_tenant):
    upload_id = api.post(
        "/v1/uploads",
        json={"filename": "t.jsonl", "purpose": "fine-tune", "bytes": 10, "mime_type": "text/jsonl"},
    ).json()["id"]
    assert other_tenant.post(f"/v1/uploads/{upload_id}/parts", files={"data": ("p", b"x")}).status_code == 404
    assert other_tenant.post(f"/v1/uploads/{upload_id}/complete", json={"part_ids": ["x"]}).status_code == 404
    assert other_tenant.post(f"/v1/uploads/{upload_id}/cancel").status_code == 404
    assert api.post(f"/v1/uploads/{upload_id}/cancel").json()["status"] == "cancelled"


def test_an_upload_in_parts_becomes_one_validated_file(api):
    body = chat_lines(30)
    upload_id = api.post(
        "/v1/uploads",
        json={"filename": "big.jsonl", "purpose": "fine-tune", "bytes": len(body), "mime_type": "text/jsonl"},
    ).json()["id"]
    # Split mid-line, sent out of order: the order given at completion is what counts.
    first, second = body[:333], body[333:]
    part_2 = api.post(f"/v1/uploads/{upload_id}/parts", files={"data": ("p2", second)}).json()["id"]
    part_1 = api.post(f"/v1/uploads/{upload_id}/parts", files={"data": ("p1", first)}).json()["id"]
    done = api.post(f"/v1/uploads/{upload_id}/complete", json={"part_ids": [part_1, part_2]}).json()
    assert done["status"] == "completed"
    assert done["file"]["status"] == "processed"
    assert done["file"]["n_examples"] == 30
    assert api.get(f"/v1/files/{done['file']['id']}/content").content == body


def test_completing_with_missing_bytes_is_refused(api):
    upload_id = api.post(
        "/v1/uploads",
        json={"filename": "t.jsonl", "purpose": "fine-tune", "bytes": 100, "mime_type": "text/jsonl"},
    ).json()["id"]
    part = api.post(f"/v1/uploads/{upload_id}/parts", files={"data": ("p", b"x" * 10)}).json()["id"]
    response = api.post(f"/v1/uploads/{upload_id}/complete", json={"part_ids": [part]})
    assert response.status_code == 400
    assert "10 bytes" in response.json()["error"]["message"]
