"""Uploads larger than TUNERY_SYNC_VALIDATION_BYTES: received as they arrive (stored in S3 meanwhile),
answered `uploaded`, validated after the answer, and validated again by the next API process if the one that
answered died first. Real Redis and a real S3 server (moto); a small sync limit keeps the files small."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import pytest
import redis
from openai import OpenAI

from shared.data.formats import check_dataset
from shared.platform.file_store import FileStore
from shared.platform.records import DEFAULT_TENANT, FileRecord, now
from tests.api_fixtures import ADMIN_KEY, chat_lines, wait_validated
from tests.helpers import wait_for
from tests.live import LiveTunery, live_env
from tests.served_api import client, served_app

served = served_app  # the fixture, for this module's tests

MIB = 1024 * 1024
SYNC_BYTES = 64 * 1024
MAX_UPLOAD_BYTES = 12 * MIB


@pytest.fixture
def api_settings(api_settings):
    """Files over 64 KiB are validated after the answer; uploads may hold 12 MiB."""
    return api_settings.model_copy(
        update={"sync_validation_bytes": SYNC_BYTES, "max_upload_bytes": MAX_UPLOAD_BYTES}
    )


def post_file(http: httpx.Client, body: bytes) -> dict:
    response = http.post("/v1/files", files={"file": ("train.jsonl", body)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_file_over_the_sync_size_is_answered_uploaded_then_becomes_processed_with_its_report(served):
    body = chat_lines(2000)
    assert len(body) > SYNC_BYTES
    with client(served) as http:
        answer = post_file(http, body)
        assert (answer["status"], answer["n_examples"], answer["report"]) == ("uploaded", None, None)
        file = wait_validated(http, answer)
    assert (file["status"], file["status_details"], file["n_examples"]) == ("processed", None, 2000)
    assert (file["format"], file["task"]) == ("chat", "chat")
    # The report a validation before the answer would have given.
    check = check_dataset(io.BytesIO(body), filename="train.jsonl")
    assert file["report"]["stats"] == json.loads(json.dumps(check.stats))
    assert file["report"]["suggested_split"] is not None


def test_the_openai_sdk_waits_for_a_file_over_the_sync_size_with_wait_for_processing(served):
    sdk = OpenAI(base_url=f"{served}/v1", api_key=ADMIN_KEY, _strict_response_validation=True)
    created = sdk.files.create(file=("train.jsonl", chat_lines(2000)), purpose="fine-tune")
    file = sdk.files.wait_for_processing(created.id, poll_interval=0.1, max_wait_seconds=60)
    assert (created.status, file.status) == ("uploaded", "processed")


def test_a_bad_file_over_the_sync_size_becomes_error_naming_its_problem(served):
    lines = chat_lines(2000).splitlines(keepends=True)
    lines[2] = b'{"messages": [{"role": "user", "content": "hi"}\n'
    with client(served) as http:
        answer = post_file(http, b"".join(lines))
        assert answer["status"] == "uploaded"
        file = wait_validated(http, answer)
    assert file["status"] == "error"
    assert "line 3: invalid JSON" in file["status_details"]
    assert file["problems"][0]["line"] == 3


def test_an_upload_in_parts_over_the_sync_size_completes_with_its_file_uploaded_then_processed(served):
    body = chat_lines(2000)
    create = {"filename": "big.jsonl", "purpose": "fine-tune", "bytes": len(body), "mime_type": "text/jsonl"}
    with client(served) as http:
        upload_id = http.post("/v1/uploads", json=create).json()["id"]
        halves = (body[: len(body) // 2], body[len(body) // 2 :])
        parts = [
            http.post(f"/v1/uploads/{upload_id}/parts", files={"data": half}).json()["id"] for half in halves
        ]
        done = http.post(f"/v1/uploads/{upload_id}/complete", json={"part_ids": parts}).json()
        assert (done["status"], done["file"]["status"]) == ("completed", "uploaded")
        file = wait_validated(http, done["file"])
    assert (file["status"], file["n_examples"], file["bytes"]) == ("processed", 2000, len(body))
    assert file["sha256"] == hashlib.sha256(body).hexdigest()


def s3_client(s3_server) -> Any:
    return boto3.client(
        "s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
        aws_access_key_id=s3_server.access_key_id, aws_secret_access_key=s3_server.secret_access_key,
    )  # fmt: skip


def test_the_recorded_bytes_and_sha256_are_those_of_the_uploaded_file_stored_in_one_put(
    served, s3_server, bucket_storage
):
    body = chat_lines(110_000)  # over 8 MiB: it would take several S3 parts
    assert len(body) > 8 * MIB
    with client(served) as http:
        answer = post_file(http, body)
        assert http.get(f"/v1/files/{answer['id']}/content").content == body
    assert (answer["bytes"], answer["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    key = f"tenants/{DEFAULT_TENANT}/files/{answer['id']}"
    assert bucket_storage.get_bytes(key) == body
    # The form's Content-Length told the file's size: one streamed PUT (a multipart ETag ends in -<parts>).
    assert "-" not in s3_client(s3_server).head_object(Bucket=bucket_storage.bucket, Key=key)["ETag"]


def test_a_file_sent_before_the_forms_other_fields_is_stored_whole(served, bucket_storage):
    # curl -F file=@train.jsonl -F purpose=fine-tune sends the file first: the size guessed from the
    # Content-Length is wrong, and storage gets the file from the API's local copy instead.
    boundary = "tunery-test-boundary"
    data = chat_lines(110_000)
    body = b"".join(
        [
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'.encode(),
            data,
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'.encode(),
            f"--{boundary}--\r\n".encode(),
        ]
    )  # fmt: skip
    with client(served) as http:
        response = http.post(
            "/v1/files", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert http.get(f"/v1/files/{answer['id']}/content").content == data
    assert (answer["bytes"], answer["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert bucket_storage.get_bytes(f"tenants/{DEFAULT_TENANT}/files/{answer['id']}") == data


def test_a_streamed_upload_over_the_size_limit_gets_413_and_stores_nothing(served, s3_server, bucket_storage):
    boundary = "tunery-test-boundary"

    def form() -> Iterator[bytes]:
        """Sent chunked: no Content-Length, so only the streaming parse can see the file is too large."""
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'.encode()
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'.encode()
        for _ in range(MAX_UPLOAD_BYTES // MIB + 1):
            yield chat_lines(20_000)[:MIB]
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    with client(served) as http:
        response = http.post("/v1/files", content=form(), headers=headers)
        listed = http.get("/v1/files").json()["data"]
    assert response.status_code == 413, response.text
    assert response.json()["error"]["param"] == "file"
    assert listed == []
    assert bucket_storage.list_keys("tenants") == []
    assert s3_client(s3_server).list_multipart_uploads(Bucket=bucket_storage.bucket).get("Uploads", []) == []


def test_an_upload_whose_client_disconnects_midway_stores_nothing_and_stops_sending_to_s3(
    served, bucket_storage
):
    boundary = "tunery-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'.encode()
    )
    data = chat_lines(110_000)
    tail = f"\r\n--{boundary}--\r\n".encode()
    host, port = served.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(
            f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(head) + len(data) + len(tail)}\r\n\r\n".encode()
        )
        raw.sendall(head + data[: len(data) // 2])  # the announced size is streamed to S3 meanwhile
        wait_for(lambda: _sending_to_s3(), 10, "the streamed PUT")
    wait_for(lambda: not _sending_to_s3(), 10, "the streamed PUT broken off")
    with client(served) as http:
        assert http.get("/v1/files").json()["data"] == []
    assert bucket_storage.list_keys("tenants") == []


def _sending_to_s3() -> bool:
    """Whether this process (which serves the API) has a streamed PUT's sending thread."""
    return any(thread.name.startswith("s3-put") for thread in threading.enumerate())


def test_a_file_still_uploaded_is_refused_by_jobs_evaluations_preview_and_report_as_not_ready(api):
    ctx = api.app.state.context
    record = FileRecord(
        id="file-stillbeingvalidated", tenant=DEFAULT_TENANT, filename="train.jsonl", purpose="fine-tune",
        bytes=100, created_at=now(), status="uploaded", sha256="0" * 64, storage_key="unused",
    )  # fmt: skip
    ctx.files.claim_validation(record.id, 60)  # as the process validating it holds it
    ctx.files.save(record)
    job = api.post("/v1/fine_tuning/jobs", json={"model": "tunery/tiny-chat", "training_file": record.id})
    evaluation = api.post("/v1/evaluations", json={"model": "tunery/tiny-chat", "validation_file": record.id})
    preview = api.get(f"/v1/files/{record.id}/preview")
    report = api.get(f"/v1/files/{record.id}/report")
    error = job.json()["error"]
    assert (job.status_code, error["code"], error["param"]) == (400, "file_not_ready", "training_file")
    assert error["message"].startswith(
        f"{record.id} is still being validated (status uploaded); retry when its status is processed"
    )
    assert (evaluation.status_code, evaluation.json()["error"]["code"]) == (400, "file_not_ready")
    assert evaluation.json()["error"]["param"] == "validation_file"
    assert [(r.status_code, r.json()["error"]["code"]) for r in (preview, report)] == [
        (400, "file_not_ready")
    ] * 2


def test_a_file_left_uploaded_by_a_killed_api_is_validated_by_the_next_one(
    tmp_path, redis_url, s3_server, bucket_storage
):
    env = live_env(
        tmp_path, redis_url, {
            "TUNERY_S3_BUCKET": bucket_storage.bucket, "TUNERY_S3_ENDPOINT_URL": s3_server.endpoint_url,
            "TUNERY_S3_ACCESS_KEY_ID": s3_server.access_key_id,
            "TUNERY_S3_SECRET_ACCESS_KEY": s3_server.secret_access_key, "TUNERY_SYNC_VALIDATION_BYTES": "1000",
        },
    )  # fmt: skip
    (tmp_path / "logs").mkdir()
    tunery = LiveTunery(
        env=env, base_url=f"http://127.0.0.1:{env['TUNERY_API_PORT']}", logs=tmp_path / "logs"
    )
    files = FileStore(redis.Redis.from_url(redis_url))
    try:
        tunery.start("api")
        with tunery.client() as http:
            answer = post_file(http, chat_lines(300_000))  # about 30 MB: seconds of validation
        tunery.processes["api"].kill()
        tunery.processes["api"].wait()
        assert files.get(answer["id"], DEFAULT_TENANT).status == "uploaded"

        tunery.start("api")
        with tunery.client() as http:
            file = wait_validated(http, answer)
    finally:
        tunery.stop()
    assert (file["status"], file["n_examples"]) == ("processed", 300_000), tunery.log_tail("api")
