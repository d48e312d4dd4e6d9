"""What happens to work whose process was killed or whose worker was lost: which budget a death counts
against, and the janitor in every state (end to end with real processes: tests/test_faults.py,
tests/test_e2e_pipeline.py and tests/test_e2e_resume.py)."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from shared.platform import janitor
from shared.platform.evaluation_store import EvaluationStore
from shared.platform.job_states import JobState
from shared.platform.job_store import JobStore
from shared.platform.queue import (
    EVAL_QUEUE,
    EVAL_TASK,
    PREPARE_QUEUE,
    PREPARE_TASK,
    STANDALONE_EVAL_TASK,
    TRAIN_TASK,
    enqueue_training,
    queue,
)
from shared.platform.records import EvaluationRecord, now
from shared.platform.recovery import recover_killed_task
from shared.platform.settings import Settings
from shared.platform.storage import storage_from_settings
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


def _sweep_after_silence(settings: Settings, client: redis.Redis, jobs: JobStore) -> list[str]:
    """A sweep once every task has been silent for longer than the settings allow (no lock held)."""
    time.sleep(settings.worker_lost_after_seconds + 0.1)
    client.delete(janitor.LOCK_KEY)
    return janitor.sweep(settings, client, jobs)


def _impatient(settings: Settings) -> Settings:
    return settings.model_copy(update={"worker_lost_after_seconds": 0.5, "janitor_interval_seconds": 0.1})


def test_a_job_whose_task_is_not_queued_yet_is_left_alone_until_it_stays_missing(
    redis_url: str, tmp_path: Path
) -> None:
    """The trainer moves a job to evaluating just before it queues the evaluation: no false alarm then."""
    settings, client, jobs = _setup(redis_url, tmp_path)
    settings = _impatient(settings)
    record = job_record(state=JobState.EVALUATING)
    jobs.create(record, "created")
    assert janitor.sweep(settings, client, jobs) == []
    assert _sweep_after_silence(settings, client, jobs) == [record.id]
    recovered = jobs.require(record.id)
    assert recovered.state is JobState.EVALUATING and recovered.error is None
    assert queue(client, EVAL_QUEUE).job_ids == [f"{record.id}-eval-0"]


def test_the_janitor_requeues_a_preparation_whose_task_vanished(redis_url: str, tmp_path: Path) -> None:
    settings, client, jobs = _setup(redis_url, tmp_path)
    settings = _impatient(settings)
    record = job_record(state=JobState.VALIDATING_FILES)
    jobs.create(record, "created")
    janitor.sweep(settings, client, jobs)
    assert _sweep_after_silence(settings, client, jobs) == [record.id]
    assert jobs.require(record.id).state is JobState.VALIDATING_FILES
    assert queue(client, PREPARE_QUEUE).job_ids == [f"{record.id}-prepare"]


def test_the_janitor_requeues_a_queued_job_whose_task_vanished_as_a_new_attempt(
    redis_url: str, tmp_path: Path
) -> None:
    settings, client, jobs = _setup(redis_url, tmp_path)
    settings = _impatient(settings)
    record = job_record(state=JobState.QUEUED)
    jobs.create(record, "created")
    janitor.sweep(settings, client, jobs)
    assert _sweep_after_silence(settings, client, jobs) == [record.id]
    requeued = jobs.require(record.id)
    assert requeued.state is JobState.QUEUED and requeued.attempt == 1
    assert requeued.infrastructure_retries == 1 and requeued.failed_attempts == 0
    assert queue(client, "train:cpu").job_ids == [f"{record.id}-train-1"]


def test_the_janitor_leaves_a_job_waiting_in_its_queue_and_a_paused_job_alone(
    redis_url: str, tmp_path: Path
) -> None:
    settings, client, jobs = _setup(redis_url, tmp_path)
    settings = _impatient(settings)
    waiting, paused = job_record(state=JobState.QUEUED), job_record(state=JobState.PAUSED)
    for record in (waiting, paused):
        jobs.create(record, "created")
    enqueue_training(client, waiting.id, 0, "cpu", 60)
    janitor.sweep(settings, client, jobs)
    assert _sweep_after_silence(settings, client, jobs) == []


def test_silence_is_counted_from_when_redis_answered_again(redis_url: str, tmp_path: Path) -> None:
    """No worker can heartbeat through a Redis outage: after one it gets the full time to show itself."""
    settings, client, jobs = _setup(redis_url, tmp_path)
    settings = _impatient(settings)
    record = job_record(state=JobState.EVALUATING)
    jobs.create(record, "created")
    janitor.sweep(settings, client, jobs)
    time.sleep(0.6)
    client.delete(janitor.LOCK_KEY)
    assert janitor.sweep(settings, client, jobs, reachable_since=time.time()) == []


def test_platform_faults_do_not_use_up_the_attempts_of_a_job(redis_url: str, tmp_path: Path) -> None:
    settings, client, jobs = _setup(redis_url, tmp_path)
    record = job_record(state=JobState.RUNNING)
    jobs.create(record, "created")
    for attempt in range(settings.max_attempts + 2):
        if attempt:
            jobs.transition(record.id, JobState.RUNNING, "a trainer took it", expected_attempt=attempt)
        recover_killed_task(
            settings, client, TRAIN_TASK, [record.id, attempt], "worker lost", infrastructure=True
        )
    survivor = jobs.require(record.id)
    assert survivor.state is JobState.QUEUED and survivor.attempt == settings.max_attempts + 2
    assert survivor.failed_attempts == 0 and survivor.infrastructure_retries == settings.max_attempts + 2


def test_the_jobs_own_deaths_fail_it_after_its_attempts(redis_url: str, tmp_path: Path) -> None:
    settings, client, jobs = _setup(redis_url, tmp_path)
    record = job_record(state=JobState.RUNNING)
    jobs.create(record, "created")
    for attempt in range(settings.max_attempts):
        if attempt:
            jobs.transition(record.id, JobState.RUNNING, "a trainer took it", expected_attempt=attempt)
        recover_killed_task(settings, client, TRAIN_TASK, [record.id, attempt], "signal 9")
    failed = jobs.require(record.id)
    assert failed.state is JobState.FAILED and failed.error.code == "worker_died"
    assert f"on each of {settings.max_attempts} attempts" in failed.error.message


def test_platform_faults_end_a_job_once_their_own_budget_is_spent(redis_url: str, tmp_path: Path) -> None:
    settings, client, jobs = _setup(redis_url, tmp_path)
    settings = settings.model_copy(update={"max_infrastructure_retries": 1})
    record = job_record(state=JobState.RUNNING)
    jobs.create(record, "created")
    recover_killed_task(settings, client, TRAIN_TASK, [record.id, 0], "worker lost", infrastructure=True)
    jobs.transition(record.id, JobState.RUNNING, "a trainer took it", expected_attempt=1)
    recover_killed_task(settings, client, TRAIN_TASK, [record.id, 1], "worker lost", infrastructure=True)
    failed = jobs.require(record.id)
    assert failed.state is JobState.FAILED and failed.error.code == "worker_lost"


def test_a_killed_evaluation_is_evaluated_again(redis_url: str, tmp_path: Path) -> None:
    settings, client, jobs = _setup(redis_url, tmp_path)
    record = job_record(state=JobState.EVALUATING)
    jobs.create(record, "created")
    recover_killed_task(settings, client, EVAL_TASK, [record.id, 0], "signal 9")
    again = jobs.require(record.id)
    assert again.state is JobState.EVALUATING and again.failed_attempts == 1
    assert queue(client, EVAL_QUEUE).job_ids == [f"{record.id}-eval-0"]
    assert "evaluating again" in jobs.all_events(record.id)[-1]["message"]
