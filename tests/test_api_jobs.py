"""The fine-tuning job endpoints, without workers: creation, resolution of "auto", cancel, events."""

from __future__ import annotations

import json

import redis

from shared.platform.queue import PREPARE_QUEUE, queue, train_queue_name
from tests.api_fixtures import chat_lines, prepared


def upload(api, n: int = 20) -> str:
    return api.post(
        "/v1/files", files={"file": ("t.jsonl", chat_lines(n))}, data={"purpose": "fine-tune"}
    ).json()["id"]


def create(api, training_file: str, **body):
    return api.post(
        "/v1/fine_tuning/jobs", json={"model": "tunery/tiny-chat", "training_file": training_file, **body}
    )


def test_a_created_job_validates_its_files_then_is_queued_with_resolved_hyperparameters(
    api, api_settings, redis_url
):
    response = create(api, upload(api, 20), suffix="demo", seed=7)
    assert response.status_code == 200
    job = response.json()
    assert job["object"] == "fine_tuning.job"
    assert (job["status"], job["seed"]) == ("validating_files", 7)
    assert job["hyperparameters"] == {
        "batch_size": "auto",
        "learning_rate_multiplier": "auto",
        "n_epochs": "auto",
    }
    client = redis.Redis.from_url(redis_url)
    assert queue(client, PREPARE_QUEUE).job_ids == [f"{job['id']}-prepare"]

    job = prepared(api, api_settings, job["id"])
    assert job["status"] == "queued"
    # 18 training rows (2 held out): OpenAI's heuristic lifts epochs until examples × epochs ≥ 100.
    assert job["hyperparameters"] == {"batch_size": 1, "learning_rate_multiplier": 1.0, "n_epochs": 6}
    assert job["hyperparameter_reasons"]["n_epochs"].startswith("auto")
    assert job["requested_hyperparameters"] == {}
    assert job["estimate"]["optimizer_steps"] == 6 * 18
    assert queue(client, train_queue_name("cpu")).job_ids == [f"{job['id']}-train-0"]


def test_explicit_hyperparameters_and_lora_settings_are_kept(api, api_settings):
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}}
    job = create(api, upload(api), method=method, lora={"r": 4, "alpha": 8, "dropout": 0.0}).json()
    job = prepared(api, api_settings, job["id"])
    assert job["hyperparameters"]["n_epochs"] == 2
    assert job["hyperparameters"]["batch_size"] == 4
    assert job["hyperparameter_reasons"]["batch_size"] == "set by the request"
    assert job["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None}


def test_out_of_range_hyperparameter_names_the_field(api):
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 99}}}
    error = create(api, upload(api), method=method).json()["error"]
    assert error["param"] == "method.supervised.hyperparameters.n_epochs"
    assert "between 1 and 50" in error["message"]


def test_model_outside_the_catalog_is_refused(api):
    response = api.post("/v1/fine_tuning/jobs", json={"model": "/etc/passwd", "training_file": upload(api)})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


def test_invalid_training_file_is_refused_with_its_problems(api):
    file_id = api.post(
        "/v1/files", files={"file": ("t.jsonl", chat_lines(3))}, data={"purpose": "fine-tune"}
    ).json()["id"]
    response = create(api, file_id)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "training_file"
    assert "at least 10 are required" in error["message"]


def test_cancel_stops_a_queued_job_and_a_second_cancel_is_not_409(api):
    job_id = create(api, upload(api)).json()["id"]
    cancelled = api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["finished_at"] is not None
    again = api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert again.status_code == 400
    assert again.json()["error"]["code"] == "job_not_cancellable"


def test_events_are_listed_newest_first_and_page_with_after(api):
    job_id = create(api, upload(api)).json()["id"]
    api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    events = api.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()
    messages = [e["message"] for e in events["data"]]
    assert messages[0] == "Job cancelled by the user"
    assert messages[-1].startswith("Created fine-tuning job")
    first_page = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1}).json()
    assert first_page["has_more"] is True
    rest = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": first_page["last_id"]}).json()
    assert [e["message"] for e in rest["data"]] == messages[1:]


def test_jobs_list_pages_newest_first(api):
    file_id = upload(api)
    ids = [create(api, file_id).json()["id"] for _ in range(3)]
    page = api.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == [ids[2], ids[1]]
    assert page["has_more"] is True
    rest = api.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": page["last_id"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False


def test_unknown_job_answers_404(api):
    assert api.get("/v1/fine_tuning/jobs/ftjob-nope").status_code == 404
    assert api.post("/v1/fine_tuning/jobs/ftjob-nope/cancel").status_code == 404


def test_models_list_the_catalog(api):
    models = api.get("/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert "tunery/tiny-chat" in ids
    assert api.get("/v1/models/tunery/tiny-chat").json()["object"] == "model"
    assert api.get("/v1/models/no-such-model").status_code == 404


def chat_with_emails(n: int) -> bytes:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Mail person{i}@example.com"},
                {"role": "assistant", "content": "ok"},
            ]
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_an_uploaded_file_reports_personal_data_and_a_suggested_split(api):
    file = api.post(
        "/v1/files", files={"file": ("t.jsonl", chat_with_emails(20))}, data={"purpose": "fine-tune"}
    ).json()
    assert file["report"]["personal_data"]["counts"] == {"email": 20}
    assert file["report"]["personal_data"]["first_seen"]["email"][0] == "line 1"
    assert file["report"]["suggested_split"]["validation"] == 2


def test_data_policy_reject_fails_a_job_whose_files_hold_personal_data(api, api_settings):
    file_id = api.post(
        "/v1/files", files={"file": ("t.jsonl", chat_with_emails(20))}, data={"purpose": "fine-tune"}
    ).json()["id"]
    job = prepared(api, api_settings, create(api, file_id, data_policy="reject").json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "personal_data_found"
    assert "20 email" in job["error"]["message"] and "line 1" in job["error"]["message"]


def test_data_policy_warn_queues_the_job_with_a_warning(api, api_settings):
    file_id = api.post(
        "/v1/files", files={"file": ("t.jsonl", chat_with_emails(20))}, data={"purpose": "fine-tune"}
    ).json()["id"]
    job = prepared(api, api_settings, create(api, file_id).json()["id"])
    assert job["status"] == "queued"
    events = api.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    assert any(e["level"] == "warn" and "20 email" in e["message"] for e in events)


def test_data_policy_redact_trains_on_redacted_text(tmp_path):
    from shared.ml.chat_data import read_conversations

    path = tmp_path / "upload"
    path.write_bytes(chat_with_emails(2))
    redacted = read_conversations(path, "t.jsonl", redact=True)
    assert redacted[0][0]["content"] == "Mail [REDACTED:email]"
    assert read_conversations(path, "t.jsonl")[0][0]["content"] == "Mail person0@example.com"


def test_more_gpus_than_the_class_has_per_node_are_refused_naming_num_gpus(api):
    response = create(api, upload(api), num_gpus=2)  # the default cpu class has one device per node
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "num_gpus"


def test_sharded_training_on_the_cpu_class_is_refused_naming_distributed(api):
    response = create(api, upload(api), distributed="fsdp")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "distributed"


def test_a_job_with_a_checkpoint_interval_shows_it(api):
    job = create(api, upload(api), checkpoint_every_steps=25, checkpoint_every_seconds=600).json()
    assert (job["checkpoint_every_steps"], job["checkpoint_every_seconds"]) == (25, 600)
    assert (job["num_gpus"], job["num_nodes"], job["distributed"], job["resume_checkpoint"]) == (
        1,
        1,
        "ddp",
        None,
    )


def test_jobs_on_the_same_file_without_a_seed_hold_out_the_same_rows_and_a_given_seed_chooses_its_own(
    api, redis_url
):
    """Each job without a seed draws its own for training, but the held-out split's seed comes from the
    file's content: the evaluations compare on the same rows, and the base model is scored once."""
    first_file, same_content = upload(api, 20), upload(api, 20)
    store = redis.Redis.from_url(redis_url)

    def stored(job_id: str) -> dict:
        return json.loads(store.get(f"tunery:job:{job_id}"))

    a = stored(create(api, first_file).json()["id"])
    b = stored(create(api, same_content).json()["id"])
    seeded = stored(create(api, first_file, seed=7).json()["id"])

    assert a["seed"] != b["seed"]
    assert a["holdout_seed"] == b["holdout_seed"]
    assert seeded["holdout_seed"] == 7
