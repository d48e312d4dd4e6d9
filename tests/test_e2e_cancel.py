"""End to end on real processes: a cancel reaches the job wherever it is (data preparation, evaluation),
stops it within seconds, publishes nothing and leaves nothing in a queue.

Cancelling a queued job and a training job: tests/test_cancel.py and test_e2e_pipeline.py.
"""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from shared.platform import storage_keys
from shared.platform.queue import EVAL_QUEUE, PREPARE_QUEUE, queue, train_queue_name
from shared.platform.storage import S3Storage
from tests.api_fixtures import chat_lines
from tests.live import LiveTunery

pytestmark = pytest.mark.slow

# Long references: each model generates up to 512 tokens for each prompt, which keeps the evaluation busy
# longer than a cancel may take to stop it.
LONG_REPLY = " ".join(f"step {i} of a long answer." for i in range(120))
VALIDATION = "".join(
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"Explain {i}."},
                {"role": "assistant", "content": LONG_REPLY},
            ]
        }
    )
    + "\n"
    for i in range(32)
).encode()


def upload(client: httpx.Client, body: bytes, name: str) -> str:
    response = client.post("/v1/files", files={"file": (name, body)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def task_status(redis: Redis, task_id: str) -> str | None:
    """The RQ status of a task; None while RQ has no such task."""
    task = Job.fetch_many([task_id], connection=redis, serializer=JSONSerializer)[0]
    return task.get_status(refresh=False) if task else None


def wait_until(predicate, timeout: float, what: str, live: LiveTunery, interval: float = 0.05) -> float:
    """Poll `predicate` until it holds; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(
                f"{what} after {timeout:.0f} s\n--- evaluator ---\n{live.log_tail('evaluator')}"
            )
        time.sleep(interval)
    return time.monotonic() - start


def evaluating_job(live: LiveTunery, client: httpx.Client, redis: Redis) -> dict:
    """A small job whose evaluation has started on the evaluator."""
    body = {
        "model": "tunery/tiny-chat",
        "training_file": upload(client, chat_lines(32), "train.jsonl"),
        "validation_file": upload(client, VALIDATION, "valid.jsonl"),
        "hyperparameters": {"n_epochs": 1, "batch_size": 8},
    }
    job_id = client.post("/v1/fine_tuning/jobs", json=body).json()["id"]

    def started() -> bool:
        events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 5}).raise_for_status()
        data = events.json()["data"]
        assert not [e["message"] for e in data if e["level"] == "error"]
        return any(e["message"].startswith("Evaluation started") for e in data)

    wait_until(started, 300, "no evaluation started", live, interval=0.2)  # within the API's rate limit
    return client.get(f"/v1/fine_tuning/jobs/{job_id}").json()


def assert_nothing_published(client: httpx.Client, storage: S3Storage, job_id: str) -> None:
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert (job["status"], job["evaluation"], job["fine_tuned_model"]) == ("cancelled", None, None)
    tenant = job["organization_id"]
    for key in (
        storage_keys.evaluation_report_key(tenant, job_id),
        storage_keys.model_card_key(tenant, job_id),
        storage_keys.generations_key(tenant, job_id),
    ):
        assert storage.list_keys(key) == []
    assert all(job_id not in m["id"] for m in client.get("/v1/models").json()["data"])


def test_cancel_during_evaluation_stops_it_within_seconds_and_frees_the_evaluator(
    live: LiveTunery, bucket_storage: S3Storage, redis_url: str
):
    redis = Redis.from_url(redis_url)
    with live.client() as client:
        job = evaluating_job(live, client, redis)
        assert job["stage"] == "evaluating"
        assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        took = wait_until(
            lambda: task_status(redis, f"{job['id']}-eval-0") == "finished",
            10,
            "evaluation still running",
            live,
        )
        task = Job.fetch(f"{job['id']}-eval-0", connection=redis, serializer=JSONSerializer)
        assert task.return_value() == "cancelled", live.log_tail("evaluator")
        # The evaluator takes the next task: an estimate (it would answer 503 after 120 s if busy).
        start = time.monotonic()
        estimate = client.post(
            "/v1/fine_tuning/jobs/estimate",
            json={"model": "tunery/tiny-chat", "training_file": job["training_file"]},
        )
        assert estimate.status_code == 200, estimate.text
        assert time.monotonic() - start < 30
        assert_nothing_published(client, bucket_storage, job["id"])
    assert took < 10
    assert queue(redis, EVAL_QUEUE).count == 0


def test_a_sigterm_after_a_cancel_does_not_requeue_the_evaluation(
    live: LiveTunery, bucket_storage: S3Storage, redis_url: str
):
    redis = Redis.from_url(redis_url)
    evaluator = live.processes["evaluator"]
    with live.client() as client:
        job = evaluating_job(live, client, redis)
        assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        # At once: the horse gets the signal before or after it has seen the cancel, and either way the
        # cancelled job's evaluation must not go back to the queue.
        evaluator.send_signal(signal.SIGTERM)
        eval_task = f"{job['id']}-eval-0"
        wait_until(lambda: task_status(redis, eval_task) == "finished", 30, "evaluation still running", live)
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        assert_nothing_published(client, bucket_storage, job["id"])
    assert Job.fetch(eval_task, connection=redis, serializer=JSONSerializer).return_value() == "cancelled"
    assert not [e["message"] for e in events if "re-queued" in e["message"]]
    # The evaluator stops after its task: an evaluation queued again would wait there.
    assert queue(redis, EVAL_QUEUE).count == 0


def test_cancel_during_data_preparation_never_trains(live: LiveTunery, redis_url: str):
    redis = Redis.from_url(redis_url)
    with live.client() as client:
        # Enough rows that preparing them takes a while.
        training_file = upload(client, chat_lines(20_000), "big.jsonl")
        job = client.post(
            "/v1/fine_tuning/jobs", json={"model": "tunery/tiny-chat", "training_file": training_file}
        ).json()
        prepare = f"{job['id']}-prepare"
        wait_until(lambda: task_status(redis, prepare) == "started", 60, "preparation not started", live)
        assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        wait_until(lambda: task_status(redis, prepare) == "finished", 60, "preparation still running", live)
        final = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    task = Job.fetch(prepare, connection=redis, serializer=JSONSerializer)
    assert task.return_value() == "skipped (cancelled)", live.log_tail("evaluator")
    assert (final["status"], final["trained_tokens"], final["estimate"]) == ("cancelled", None, None)
    assert not [e for e in events if "queued" in e["message"].lower() or "Training" in e["message"]]
    assert task_status(redis, f"{job['id']}-train-0") is None
    assert queue(redis, train_queue_name(final["gpu_class"])).count == 0
    assert queue(redis, PREPARE_QUEUE).count == 0
