"""The API keeps its contract under hostile input: OpenAI's error object with a 400 naming the problem and
the param, never a 500, a traceback or an empty answer; names and uploads that cannot hurt anyone."""

from __future__ import annotations

import io
import threading
import time

import httpx
import pytest

from services.api import file_ingest
from shared.data.formats import check_dataset
from shared.data.validation_process import Budgeted
from tests.api_fixtures import chat_lines, prepared, wait_validated
from tests.served_api import client, served_app

served = served_app  # the fixture, for this module's tests

AUTO_SETTINGS = (
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "early_stopping_patience",
    "early_stopping_min_delta",
    "label_smoothing",
)


def upload(api, body: bytes = b"", name: str = "train.jsonl") -> dict:
    response = api.post(
        "/v1/files", files={"file": (name, body or chat_lines(20))}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 200, response.text
    return response.json()


def job_body(training_file: str, **hyperparameters) -> dict:
    return {
        "model": "tunery/tiny-chat",
        "training_file": training_file,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    }


def assert_openai_error(response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    return error


# -- 1. "auto" for every Tunery hyperparameter ---------------------------------------------------------


def test_auto_for_every_tunery_hyperparameter_is_resolved_with_a_reason(api, api_settings):
    body = job_body(upload(api)["id"], **dict.fromkeys(AUTO_SETTINGS, "auto"))
    response = api.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    job = prepared(api, api_settings, response.json()["id"])
    assert job["status"] == "queued", job["error"]
    resolved = job["resolved_hyperparameters"]
    assert (resolved["warmup_ratio"], resolved["weight_decay"], resolved["max_grad_norm"]) == (0.03, 0.0, 1.0)
    assert (resolved["early_stopping_min_delta"], resolved["label_smoothing"]) == (0.0, 0.0)
    assert resolved["early_stopping_patience"] == 2  # on the held-out split of the file
    for name in AUTO_SETTINGS:
        assert job["hyperparameter_reasons"][name].startswith("auto:"), name


@pytest.mark.parametrize("name", AUTO_SETTINGS)
def test_estimate_accepts_auto_and_goes_on_to_check_the_request(api, name):
    """The body passes validation; the request's next check (a model outside the catalog) answers."""
    body = job_body(upload(api)["id"], **{name: "auto"}) | {"model": "no/such-model"}
    response = api.post("/v1/fine_tuning/jobs/estimate", json=body)
    assert assert_openai_error(response, 400, "model")["code"] == "model_not_found"


def test_out_of_range_setting_that_also_takes_auto_names_the_field_and_both_choices(api):
    response = api.post("/v1/fine_tuning/jobs", json=job_body(upload(api)["id"], warmup_ratio=0.9))
    error = assert_openai_error(response, 400, "method.supervised.hyperparameters.warmup_ratio")
    assert error["message"] == (
        "method.supervised.hyperparameters.warmup_ratio: Input should be less than or equal to 0.5, or 'auto'"
    )


# -- 2. the event stream's cursor ---------------------------------------------------------------------------


def cancelled_job(api) -> str:
    job_id = api.post("/v1/fine_tuning/jobs", json=job_body(upload(api)["id"])).json()["id"]
    api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    return job_id


def test_event_stream_after_a_non_event_id_is_a_400_naming_after(api):
    job_id = cancelled_job(api)
    response = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true", "after": "nope"})
    error = assert_openai_error(response, 400, "after")
    assert error["code"] == "invalid_event_id"
    assert "'nope' is not an event id" in error["message"]


def test_event_stream_with_a_malformed_last_event_id_is_a_400_naming_the_header(api):
    job_id = cancelled_job(api)
    url = f"/v1/fine_tuning/jobs/{job_id}/events"
    response = api.get(url, params={"stream": "true"}, headers={"Last-Event-ID": "ftevent-1-x"})
    assert_openai_error(response, 400, "Last-Event-ID")


def test_event_listing_after_a_stream_id_beyond_64_bits_is_a_400(api):
    job_id = cancelled_job(api)
    response = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": f"ftevent-{2**64}-0"})
    assert_openai_error(response, 400, "after")


def test_event_stream_from_a_real_last_event_id_sends_the_later_events_and_ends(api):
    job_id = cancelled_job(api)
    url = f"/v1/fine_tuning/jobs/{job_id}/events"
    oldest = api.get(url).json()["data"][-1]
    response = api.get(url, params={"stream": "true"}, headers={"Last-Event-ID": oldest["id"]})
    assert response.status_code == 200
    assert oldest["id"] not in response.text
    assert "Job cancelled by the user" in response.text
    assert response.text.rstrip().endswith('data: {"status": "cancelled"}')


# -- 6 and 7: bodies that are not JSON, messages without pydantic's prefixes -------------------------------


def test_truncated_json_body_says_it_is_not_json_with_line_and_column(api):
    response = api.post(
        "/v1/fine_tuning/jobs",
        content=b'{"model": "tunery/tiny-chat",\n "training_file": ',
        headers={"content-type": "application/json"},
    )
    error = assert_openai_error(response, 400, None)
    assert error["message"] == "the request body is not valid JSON: Expecting value (line 2, column 19)"


def test_validator_messages_carry_no_pydantic_prefix(api):
    body = job_body(upload(api)["id"]) | {"metadata": {"k" * 65: "v"}}
    error = assert_openai_error(api.post("/v1/fine_tuning/jobs", json=body), 400, "metadata")
    assert error["message"] == "metadata: keys are at most 64 characters and values at most 512"


def test_list_items_are_named_with_their_index(api):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}
    error = assert_openai_error(api.post("/v1/chat/completions", json=body), 400, "messages[1].role")
    assert error["message"].startswith("messages[1].role: Input should be 'system'")


# -- 8. file names ---------------------------------------------------------------------------------------


def upload_named(api, filename: str) -> dict:
    """A multipart upload with the file name's bytes as they are (httpx would percent-encode controls)."""
    boundary = "tunery-boundary"
    body = b"".join(
        [
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'.encode(),
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'.encode(),
            b"Content-Type: application/octet-stream\r\n\r\n",
            chat_lines(20),
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    response = api.post("/v1/files", content=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\system.ini", "system.ini"),
        ("a\x00b\x7fc\td.jsonl", "abcd.jsonl"),  # NUL, DEL, tab (a CR or LF breaks multipart itself)
        ("\x1b[31mred\x07.jsonl", "[31mred.jsonl"),  # terminal escapes and a bell
        ("evil\u202egnp.jsonl", "evilgnp.jsonl"),  # a right-to-left override that disguises the extension
        ("../..", "upload.jsonl"),
    ],
)
def test_uploaded_file_keeps_only_a_safe_base_name(api, sent, stored):
    file = upload_named(api, sent)
    assert file["filename"] == stored
    assert api.get(f"/v1/files/{file['id']}").json()["filename"] == stored


def test_overlong_file_name_is_cut_to_255_characters_keeping_its_extension(api):
    file = upload(api, name="x" * 1000 + ".jsonl")
    assert file["filename"] == "x" * 249 + ".jsonl"
    assert file["format"] == "chat"


def test_upload_api_stores_the_safe_base_name(api):
    body = {"filename": "../../etc/cron.d/job\n.jsonl", "purpose": "fine-tune", "bytes": 10, "mime_type": "x"}
    response = api.post("/v1/uploads", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "job.jsonl"


# -- 3. completing an upload happens once -------------------------------------------------------------


def upload_in_parts(http: httpx.Client, data: bytes, n_parts: int) -> tuple[str, list[str]]:
    body = {"filename": "big.jsonl", "purpose": "fine-tune", "bytes": len(data), "mime_type": "text/jsonl"}
    upload_id = http.post("/v1/uploads", json=body).json()["id"]
    size = -(-len(data) // n_parts)
    part_ids = [
        http.post(f"/v1/uploads/{upload_id}/parts", files={"data": data[i : i + size]}).json()["id"]
        for i in range(0, len(data), size)
    ]
    return upload_id, part_ids


def test_concurrent_completions_of_one_upload_make_exactly_one_file(served, bucket_storage):
    with client(served) as http:
        upload_id, part_ids = upload_in_parts(http, chat_lines(5000), 4)
    start = threading.Barrier(4)
    answers: list[httpx.Response] = []

    def complete() -> None:
        with client(served) as http:
            start.wait()
            answers.append(http.post(f"/v1/uploads/{upload_id}/complete", json={"part_ids": part_ids}))

    threads = [threading.Thread(target=complete) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(r.status_code for r in answers) == [200, 400, 400, 400], [r.text for r in answers]
    done = next(r.json() for r in answers if r.status_code == 200)
    assert (done["status"], done["file"]["status"], done["file"]["n_examples"]) == (
        "completed",
        "processed",
        5000,
    )
    for refused in (r for r in answers if r.status_code == 400):
        error = assert_openai_error(refused, 400, "upload_id")
        assert error["code"] in ("upload_in_progress", "upload_not_pending")
        assert error["message"] in (
            f"upload {upload_id} is being completed by another request; retrieve it once that has finished",
            f"upload {upload_id} is already completed",
        )
    with client(served) as http:
        assert [f["id"] for f in http.get("/v1/files").json()["data"]] == [done["file"]["id"]]
    assert [key for key in bucket_storage.list_keys("") if "/uploads/" in key] == []  # the parts are gone


def test_completing_a_completed_upload_is_a_400_that_says_so(served):
    with client(served) as http:
        upload_id, part_ids = upload_in_parts(http, chat_lines(20), 2)
        assert http.post(f"/v1/uploads/{upload_id}/complete", json={"part_ids": part_ids}).status_code == 200
        again = http.post(f"/v1/uploads/{upload_id}/complete", json={"part_ids": part_ids})
        cancel = http.post(f"/v1/uploads/{upload_id}/cancel")
    assert (
        assert_openai_error(again, 400, "upload_id")["message"] == f"upload {upload_id} is already completed"
    )
    assert assert_openai_error(cancel, 400, "upload_id")["code"] == "upload_not_pending"


# -- 4. validation has a time budget, runs in a process of its own, and blank lines cost next to nothing --


def test_a_file_of_blank_lines_counts_only_its_examples_and_their_lines(api):
    # Runs of blank lines are skipped in one step (bench/upload_concurrency.py times them); the lines around
    # them still count, so a problem after 40 MB of them names its true line.
    body = b"\n" * (40 * 1024 * 1024) + chat_lines(20) + b"  \r\n" * 1000 + b'{"messages": []}\n'
    file = wait_validated(api, upload(api, body))
    assert (file["status"], file["n_examples"]) == ("error", 20)
    assert f"line {40 * 1024 * 1024 + 20 + 1000 + 1}" in file["status_details"], file["status_details"]


def test_validation_past_its_time_budget_stops_with_a_400_naming_the_file(api, monkeypatch):
    monkeypatch.setattr(file_ingest, "validation_budget", lambda size: 0.0)
    response = api.post(
        "/v1/files", files={"file": ("train.jsonl", chat_lines(20))}, data={"purpose": "fine-tune"}
    )
    error = assert_openai_error(response, 400, "file")
    assert error["code"] == "validation_timeout"
    assert error["message"].startswith("file: validating it took more than 0 s of CPU time")


def test_a_validation_budget_covers_the_largest_file_allowed_at_a_quarter_of_the_ordinary_speed():
    assert file_ingest.validation_budget(1000) == file_ingest.VALIDATION_SECONDS
    assert file_ingest.validation_budget(1024**3) == 512  # 1 GiB at 2 MB per CPU second


def test_validation_within_its_budget_reads_the_whole_file():
    check = check_dataset(Budgeted(io.BytesIO(chat_lines(20)), seconds=60.0), filename="train.jsonl")
    assert (check.ok, check.n_examples) == (True, 20)


def test_the_api_answers_other_clients_while_a_large_upload_is_validated(served):
    # About 10 MB of chat rows: seconds of validation (after the answer, at this size). Were it done on the
    # event loop (or holding it), the loop would stop answering for most of it; done in a worker process,
    # /healthz keeps answering.
    n_rows = 100_000
    body = chat_lines(n_rows)
    answer: list[dict] = []

    def send() -> None:
        with client(served) as http:
            response = http.post(
                "/v1/files", files={"file": ("big.jsonl", body)}, data={"purpose": "fine-tune"}
            )
            assert response.status_code == 200, response.text
            answer.append(wait_validated(http, response.json()))

    uploader = threading.Thread(target=send)
    started = time.monotonic()
    uploader.start()
    slowest = 0.0
    answers = 0
    with httpx.Client(base_url=served, timeout=30) as http:
        while uploader.is_alive():
            asked = time.monotonic()
            assert http.get("/healthz").status_code == 200
            slowest = max(slowest, time.monotonic() - asked)
            answers += 1
            uploader.join(0.05)  # a client now and then, not a flood competing for this process's cores
    took = time.monotonic() - started
    assert (answer[0]["status"], answer[0]["n_examples"]) == ("processed", n_rows)
    # Relative, so that a slow or loaded machine does not matter: no answer waited for a large part of it.
    assert slowest < took / 4, f"/healthz took {slowest:.2f} s once during a {took:.2f} s upload"
    assert answers >= 10
