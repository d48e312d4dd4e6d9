"""End to end: POST /v1/evaluations measures a fine-tuned model beside its base, or a catalog model alone,
on any validation file, per group, through a real evaluator process."""

from __future__ import annotations

import json
import time

import pytest

from tests.api_fixtures import IDENTITY_CHAT
from tests.live import LiveTunery

pytestmark = pytest.mark.slow


def _upload(client, body: bytes, name: str) -> str:
    response = client.post("/v1/files", files={"file": (name, body)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _grouped_rows(n: int | None = 12) -> bytes:
    """The identity rows, each marked with a group (en or fr by turn)."""
    rows = [json.loads(line) for line in IDENTITY_CHAT.read_text().splitlines()][:n]
    return "".join(
        json.dumps({**row, "group": "en" if i % 2 else "fr"}) + "\n" for i, row in enumerate(rows)
    ).encode()


def _wait(live: LiveTunery, evaluation_id: str) -> dict:
    deadline = time.monotonic() + 240
    with live.client() as client:
        while (evaluation := client.get(f"/v1/evaluations/{evaluation_id}").json())["status"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline, live.log_tail("evaluator")
            time.sleep(0.3)
    return evaluation


def test_a_fine_tuned_model_and_a_catalog_model_are_evaluated_on_a_file_of_choice(live: LiveTunery):
    with live.client() as client:
        training = _upload(client, _grouped_rows(None), "train.jsonl")
        grouped = _upload(client, _grouped_rows(), "grouped.jsonl")
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tunery/tiny-chat", "training_file": training, "hyperparameters": {"n_epochs": 2}},
        ).json()
    final, _ = live.wait_for_job(job["id"], {"succeeded", "failed", "cancelled"})
    assert final["status"] == "succeeded", final["error"]
    # The rows held out of the training file keep their group: the job's own report is per group too.
    assert set(final["evaluation"]["by_group"]["groups"]) == {"en", "fr"}

    with live.client() as client:
        tuned = client.post(
            "/v1/evaluations",
            json={"model": final["fine_tuned_model"], "validation_file": grouped, "generation_rows": 4},
        )
        base = client.post("/v1/evaluations", json={"model": "tunery/tiny-chat", "validation_file": grouped})
    assert tuned.status_code == 200, tuned.text
    assert tuned.json()["status"] == "queued" and tuned.json()["fine_tuning_job"] == job["id"]

    report = _wait(live, tuned.json()["id"])["report"]
    assert report["n_examples"] == 12 and report["validation_source"] == "validation_file"
    assert report["fine_tuned"]["loss"] < report["base"]["loss"] and report["verdict"] == "improved"
    assert set(report["by_group"]["groups"]) == {"en", "fr"}
    assert report["generation"]["n_examples"] == 4

    alone = _wait(live, base.json()["id"])
    assert alone["status"] == "succeeded", alone["error"]
    assert alone["report"]["fine_tuned"] is None
    assert alone["report"]["base"]["loss"] == pytest.approx(report["base"]["loss"], rel=1e-4)
    with live.client() as client:
        listed = client.get("/v1/evaluations").json()["data"]
    assert [e["id"] for e in listed] == [base.json()["id"], tuned.json()["id"]]


def test_an_evaluation_request_names_what_is_wrong(live: LiveTunery):
    with live.client() as client:
        chat = _upload(client, IDENTITY_CHAT.read_bytes(), "train.jsonl")
        unknown = client.post(
            "/v1/evaluations", json={"model": "ft:nope:org:x:ftjob-1", "validation_file": chat}
        )
        missing = client.post(
            "/v1/evaluations", json={"model": "tunery/tiny-chat", "validation_file": "file-x"}
        )
        absent = client.get("/v1/evaluations/eval-missing")
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "validation_file"
    assert absent.status_code == 404
