"""What the web console reads from the REST API beyond fine-tuning itself: API keys managed by admins,
a rejected file's problems as rows, a preview of any file's first examples, the report's length
histogram, one artifact on its own, a catalog model's fit per GPU class, and the console's
Content-Security-Policy. Fast: the app in-process (TestClient) on the real test Redis."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from fastapi.testclient import TestClient

from services.api.console import CONSOLE_CSP
from shared.platform import storage_keys
from shared.platform.api_keys import KeyStore
from tests.api_fixtures import chat_lines

BROKEN_FILE = Path(__file__).parent / "fixtures" / "broken" / "wrong_role.jsonl"


@pytest.fixture
def keys(redis_url) -> KeyStore:
    return KeyStore(redis.Redis.from_url(redis_url))


def as_key(api: TestClient, key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(api: TestClient, name: str, data: bytes) -> dict:
    response = api.post("/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()


# -- API keys ----------------------------------------------------------------------------------------


def test_an_admin_creates_a_key_that_works_and_revokes_it_so_it_no_longer_does(api):
    listed = api.get("/v1/keys").json()
    assert [(k["id"], k["role"], k["current"]) for k in listed["data"]] == [("bootstrap", "admin", True)]

    created = api.post("/v1/keys", json={"name": "ci-pipeline", "role": "member"})
    assert created.status_code == 200, created.text
    key = created.json()
    assert key["key"].startswith(f"tun_{key['id']}_")
    assert (key["name"], key["role"], key["organization_id"], key["revoked_at"]) == (
        "ci-pipeline", "member", "org-default", None,
    )  # fmt: skip
    assert api.get("/v1/files", headers=as_key(api, key["key"])).status_code == 200
    # The secret is shown once: the list names the key, never the key itself.
    again = api.get("/v1/keys").json()["data"]
    assert {k["id"] for k in again} == {"bootstrap", key["id"]}
    assert all("key" not in k for k in again)

    revoked = api.post(f"/v1/keys/{key['id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    refused = api.get("/v1/files", headers=as_key(api, key["key"]))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert api.post(f"/v1/keys/{key['id']}/revoke").json()["revoked_at"] == revoked.json()["revoked_at"]


def test_a_member_key_may_not_list_create_or_revoke_keys(api, keys):
    _, member = keys.create("org-default", "member", "someone")
    headers = as_key(api, member)
    for response in (
        api.get("/v1/keys", headers=headers),
        api.post("/v1/keys", json={"name": "mine", "role": "admin"}, headers=headers),
        api.post("/v1/keys/bootstrap/revoke", headers=headers),
    ):
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "insufficient_permissions"
    assert api.get("/v1/files", headers=headers).status_code == 200  # the key itself still works


def test_keys_of_another_organization_are_out_of_reach_and_a_key_cannot_revoke_itself(api, keys):
    other, _ = keys.create("org-b", "member", "theirs")
    _, other_admin = keys.create("org-b", "admin", "their admin")
    missing = api.post(f"/v1/keys/{other.id}/revoke")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "api_key_not_found"
    assert keys.get(other.id).revoked_at is None
    assert [k["id"] for k in api.get("/v1/keys", headers=as_key(api, other_admin)).json()["data"]] == [
        k.id for k in keys.list("org-b")
    ]
    itself = api.post("/v1/keys/bootstrap/revoke")
    assert itself.status_code == 400 and itself.json()["error"]["code"] == "cannot_revoke_own_key"
    assert api.get("/v1/keys").status_code == 200


def test_a_key_request_is_checked_like_every_other(api):
    no_name = api.post("/v1/keys", json={"role": "member"})
    assert no_name.status_code == 400 and no_name.json()["error"]["param"] == "name"
    bad_role = api.post("/v1/keys", json={"name": "x", "role": "owner"})
    assert bad_role.status_code == 400 and bad_role.json()["error"]["param"] == "role"
    anonymous = TestClient(api.app).get("/v1/keys")
    assert anonymous.status_code == 401


def test_the_openapi_document_lists_every_error_the_key_endpoints_answer(api):
    paths = api.get("/openapi.json").json()["paths"]
    statuses = {
        ("get", "/v1/keys"): {"401", "403", "429", "503"},
        ("post", "/v1/keys"): {"400", "401", "403", "413", "429", "503"},
        ("post", "/v1/keys/{key_id}/revoke"): {"400", "401", "403", "404", "429", "503"},
    }
    for (method, path), errors in statuses.items():
        documented = {s for s in paths[path][method]["responses"] if s[0] in "45"}
        assert documented == errors, (method, path, documented)


# -- files: problems, preview, report ----------------------------------------------------------------


def test_a_rejected_file_lists_its_problems_as_line_field_and_reason(api):
    file = upload(api, BROKEN_FILE.name, BROKEN_FILE.read_bytes())
    assert file["status"] == "error" and file["total_problems"] == 1
    assert file["problems"] == [
        {
            "place": "line",
            "line": 11,
            "field": "messages[2].role",
            "reason": '"assitant" is not one of system, user, assistant, tool',
        }
    ]
    assert api.get(f"/v1/files/{file['id']}").json()["problems"] == file["problems"]
    preview = api.get(f"/v1/files/{file['id']}/preview")
    assert preview.status_code == 400 and preview.json()["error"]["code"] == "file_not_processed"


def test_a_good_file_has_no_problems_and_a_length_histogram(api):
    file = upload(api, "chat.jsonl", chat_lines(20))
    assert (file["status"], file["problems"], file["total_problems"]) == ("processed", [], 0)
    histogram = file["report"]["stats"]["characters"]["histogram"]
    assert sum(histogram["counts"]) == 20
    assert len(histogram["edges"]) == len(histogram["counts"]) + 1


def test_the_preview_shows_the_first_examples_of_a_jsonl_chat_file(api):
    file = upload(api, "chat.jsonl", chat_lines(20))
    preview = api.get(f"/v1/files/{file['id']}/preview", params={"limit": 2}).json()
    assert [(e["source"], e["kind"]) for e in preview["data"]] == [("line 1", "chat"), ("line 2", "chat")]
    assert preview["data"][1]["messages"] == [
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2"},
    ]


def test_the_preview_reads_csv_rows_as_labelled_texts(api):
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "label", "group"])
    writer.writerows([[f"review number {i}", ("good", "bad")[i % 2], "en"] for i in range(12)])
    file = upload(api, "reviews.csv", out.getvalue().encode())
    assert file["status"] == "processed", file
    first = api.get(f"/v1/files/{file['id']}/preview", params={"limit": 1}).json()["data"]
    assert [(e["source"], e["kind"], e["text"], e["label"], e["fields"]) for e in first] == [
        ("row 1", "classification", "review number 0", "good", {"group": "en"})
    ]


def test_the_preview_reads_parquet_preference_pairs(api):
    table = pa.table(
        {
            "prompt": [f"Say hello {i}" for i in range(12)],
            "chosen": [f"Hello {i}!" for i in range(12)],
            "rejected": ["no" for _ in range(12)],
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    file = upload(api, "pairs.parquet", buffer.getvalue())
    assert file["status"] == "processed", file
    pair = api.get(f"/v1/files/{file['id']}/preview", params={"limit": 1}).json()["data"][0]
    assert pair["kind"] == "preference"
    assert pair["messages"][-1]["content"] == "Say hello 0"
    assert [m["content"] for m in pair["chosen"]] == ["Hello 0!"]
    assert [m["content"] for m in pair["rejected"]] == ["no"]


# -- one artifact, a job's data policy ---------------------------------------------------------------


def test_one_artifact_downloads_on_its_own_and_nothing_outside_the_job_does(api):
    file = upload(api, "chat.jsonl", chat_lines(20))
    job = api.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tunery/tiny-chat", "training_file": file["id"], "data_policy": "redact"},
    ).json()
    assert job["data_policy"] == "redact"
    storage = api.app.state.context.storage
    prefix = storage_keys.artifacts_prefix("org-default", job["id"])
    storage.put_bytes(prefix + "README.md", b"# ft:model\n\nA card.\n")
    storage.put_bytes(prefix + "adapter/adapter_config.json", json.dumps({"r": 8}).encode())

    card = api.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/files/README.md")
    assert card.status_code == 200 and card.text == "# ft:model\n\nA card.\n"
    assert card.headers["content-type"].startswith("text/markdown")
    nested = api.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/files/adapter/adapter_config.json")
    assert nested.json() == {"r": 8}
    for path in ("missing.bin", "../../files/x", "adapter"):
        missing = api.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/files/{path}")
        assert missing.status_code == 404, path
    assert api.get("/v1/fine_tuning/jobs/ftjob-nope/artifacts/files/README.md").status_code == 404


# -- a catalog model's fit ---------------------------------------------------------------------------


def test_a_catalog_model_reports_its_size_and_fit_per_gpu_class(api_settings):
    from services.evaluator.prepare import model_fit

    fit = model_fit({"model": "tunery/tiny-chat"}, api_settings)
    assert fit["parameters"] > 0 and fit["context_length"] == 512
    assert fit["gpu_classes"]["cpu"]["fits"] is True
    assert fit["gpu_classes"]["cpu"]["peak_memory_gib"] < fit["gpu_classes"]["cpu"]["memory_gb"]
    assert model_fit({"model": "nope/none"}, api_settings)["error"]["code"] == "model_not_found"


def test_the_fit_of_a_model_outside_the_catalog_is_a_404(api):
    response = api.get("/v1/models/ft:tunery/tiny-chat:org-default::ftjob-x/fit")
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"


# -- the console's headers ---------------------------------------------------------------------------


def test_console_pages_and_scripts_forbid_inline_and_outside_scripts(api):
    for path in ("/console/", "/console/app.js", "/console/vendor/marked/marked.esm.js"):
        response = api.get(path)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert policy == CONSOLE_CSP
        assert "script-src 'self';" in policy and "unsafe-inline" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    html = api.get("/console/").text
    assert "<script>" not in html and " style=" not in html
    docs = api.get("/docs")
    assert "script-src 'self';" in docs.headers["content-security-policy"]
    assert "<script>" not in docs.text
    # The API itself answers JSON, with no page policy.
    assert "content-security-policy" not in api.get("/v1/files").headers
