"""What happens to work whose process was killed: data preparation and standalone evaluations
(training attempts are covered end to end in tests/test_e2e_pipeline.py and tests/test_e2e_resume.py)."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from shared import janitor
from shared.evaluation_store import EvaluationStore
from shared.job_states import JobState
from shared.job_store import JobStore
from shared.queue import PREPARE_QUEUE, PREPARE_TASK, STANDALONE_EVAL_TASK, queue
from shared.records import EvaluationRecord, now
from shared.recovery import recover_killed_task
from shared.settings import Settings
from shared.storage import storage_from_settings
from tests.test_job_store import job_record


def _setup(redis_url: str, tmp_path: Path) -> tuple[Settings, redis.Redis, JobStore]:
    settings = Settings(redis_url=redis_url, data_dir=tmp_path)
    client = redis.Redis.from_url(redis_url)
    return settings, client, JobStore(client, storage_from_settings(settings))


def test_a_preparation_stopped_by_sigterm_is_queued_again(redis_url: str, tmp_path: Path) -> None:
    settings, client, jobs = _setup(redis_url, tmp_path)
    record = job_record()
    jobs.create(record, "created")
    recover_killed_task(settings, client, PREPARE_TASK, [record.id], "signal 15")
    assert jobs.require(record.id).state is JobState.VALIDATING_FILES
    assert queue(client, PREPARE_QUEUE).job_ids == [f"{record.id}-prepare"]
    assert "queued again" in jobs.all_events(record.id)[-1]["message"]


def test_a_preparation_that_died_otherwise_fails_its_job_saying_why(redis_url: str, tmp_path: Path) -> None:
    settings, client, jobs = _setup(redis_url, tmp_path)
    record = job_record()
    jobs.create(record, "created")
    recover_killed_task(settings, client, PREPARE_TASK, [record.id], "signal 9")
    failed = jobs.require(record.id)
    assert failed.state is JobState.FAILED and failed.error.code == "preparation_died"
    assert "signal 9" in failed.error.message and queue(client, PREPARE_QUEUE).job_ids == []


def test_a_killed_standalone_evaluation_fails_instead_of_running_forever(
    redis_url: str, tmp_path: Path
) -> None:
    settings, client, _ = _setup(redis_url, tmp_path)
    store = EvaluationStore(client)
    store.create(
        EvaluationRecord(
            id="eval-1", tenant="t", created_at=now(), model="m", validation_file="file-1", status="running"
        )
    )
    recover_killed_task(settings, client, STANDALONE_EVAL_TASK, ["eval-1"], "signal 9")
    evaluation = store.get("eval-1")
    assert evaluation.status == "failed" and evaluation.error.code == "evaluator_died"


def test_a_job_whose_task_is_not_queued_yet_is_left_alone_until_it_stays_missing(
    redis_url: str, tmp_path: Path
) -> None:
    """The trainer moves a job to evaluating just before it queues the evaluation: no false alarm then."""
    settings, client, jobs = _setup(redis_url, tmp_path)
    settings = settings.model_copy(update={"worker_lost_after_seconds": 0.5, "janitor_interval_seconds": 0.1})
    record = job_record(state=JobState.EVALUATING)
    jobs.create(record, "created")
    assert janitor.sweep(settings, client, jobs) == []
    time.sleep(0.6)
    client.delete(janitor.LOCK_KEY)
    assert janitor.sweep(settings, client, jobs) == [record.id]
    assert jobs.require(record.id).error.code == "evaluator_died"
