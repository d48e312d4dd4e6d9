"""Cancel withdraws a job's waiting tasks from their queues (shared.platform.cancel), on the in-process API and the
real test Redis: with no worker running, nothing would ever take them out otherwise."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from shared.platform.queue import PREPARE_QUEUE, queue, train_queue_name
from tests.api_fixtures import chat_lines, prepared


def upload(api) -> str:
    return api.post(
        "/v1/files", files={"file": ("t.jsonl", chat_lines(20))}, data={"purpose": "fine-tune"}
    ).json()["id"]


def create(api, training_file: str) -> dict:
    return api.post(
        "/v1/fine_tuning/jobs", json={"model": "tunery/tiny-chat", "training_file": training_file}
    ).json()


def queue_depths(api) -> dict[str, float]:
    """tunery_queue_depth as the API's /metrics reports it, by queue."""
    families = text_string_to_metric_families(api.get("/metrics").text)
    return {s.labels["queue"]: s.value for f in families for s in f.samples if s.name == "tunery_queue_depth"}


def test_cancel_withdraws_the_tasks_of_a_job_from_every_queue(api, api_settings, redis_url):
    redis = Redis.from_url(redis_url)
    file_id = upload(api)
    # validating_files: its preparation waits for an evaluator.
    preparing = create(api, file_id)
    # queued: a pause leaves attempt 0's training task in its queue, the resume queues attempt 1's.
    waiting = create(api, file_id)
    prepared(api, api_settings, waiting["id"])  # in this process: its preparation task stays queued too
    api.post(f"/v1/fine_tuning/jobs/{waiting['id']}/pause").raise_for_status()
    assert api.post(f"/v1/fine_tuning/jobs/{waiting['id']}/resume").json()["attempt"] == 1
    train = train_queue_name(waiting["gpu_class"])
    # Another job's tasks stay where they are.
    other = create(api, file_id)

    assert queue_depths(api) == {PREPARE_QUEUE: 3, train: 2}
    for job in (preparing, waiting):
        assert api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == "cancelled"

    assert queue_depths(api) == {PREPARE_QUEUE: 1, train: 0}
    assert queue(redis, PREPARE_QUEUE).job_ids == [f"{other['id']}-prepare"]
    withdrawn = [f"{preparing['id']}-prepare", f"{waiting['id']}-prepare"]
    withdrawn += [f"{waiting['id']}-train-0", f"{waiting['id']}-train-1"]
    assert Job.fetch_many(withdrawn, connection=redis, serializer=JSONSerializer) == [None] * 4
