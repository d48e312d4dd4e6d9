"""What happens to a job whose work horse was killed (OOM killer, SIGKILL, a crash in native code).

Also the one way a job goes back to its queue as a new attempt (`requeue_as_new_attempt`): after
a preemption, a resume, or a killed or lost worker.

The RQ worker survives its work horse and calls `recover_killed_task` for the task it ran. A
training attempt goes back to the queue as a new attempt, until the job has used its attempts;
then the job fails with an error that says what to try. An evaluation fails the job at once:
it holds nothing worth retrying blindly. A standalone evaluation (POST /v1/evaluations) fails too. A
data preparation stopped by SIGTERM (a scale-down, an eviction) is queued again; one that died otherwise
fails its job.
"""

from __future__ import annotations

import logging

from redis import Redis

from shared.evaluation_store import EvaluationStore
from shared.job_states import JobState
from shared.job_store import JobNotFound, JobStore, StaleAttempt
from shared.queue import (
    EVAL_TASK,
    PREPARE_TASK,
    STANDALONE_EVAL_TASK,
    TRAIN_TASK,
    enqueue_preparation,
    enqueue_training,
)
from shared.records import EvaluationRecord, JobError, JobRecord, now
from shared.settings import Settings
from shared.storage import storage_from_settings

log = logging.getLogger(__name__)

KILLED_HINT = "if it ran out of memory, lower batch_size or max_seq_length, or use a larger GPU class"


def recover_killed_task(settings: Settings, redis: Redis, func_name: str, args: list, reason: str) -> None:
    if func_name == STANDALONE_EVAL_TASK and len(args) == 1:
        _fail_standalone_evaluation(redis, str(args[0]), reason)
        return
    if func_name == PREPARE_TASK and len(args) == 1:
        _recover_preparation(settings, redis, str(args[0]), reason)
        return
    if func_name not in (TRAIN_TASK, EVAL_TASK) or len(args) != 2:
        return
    job_id, attempt = str(args[0]), int(args[1])
    jobs = JobStore(redis, storage_from_settings(settings), settings.max_events_per_job)
    try:
        if func_name == TRAIN_TASK:
            _retry_training(settings, redis, jobs, job_id, attempt, reason)
        else:
            message = f"The evaluation process died ({reason}); {KILLED_HINT}"
            jobs.transition(
                job_id, JobState.FAILED, message, level="error", expected_attempt=attempt,
                error=JobError(code="evaluator_died", message=message),
            )  # fmt: skip
    except (JobNotFound, StaleAttempt) as exc:
        log.info("no recovery for %s attempt %s: %s", job_id, attempt, exc)
    except Exception:
        # The job may already be cancelled, paused or finished: the state machine refuses, nothing to do.
        log.exception("could not recover %s attempt %s", job_id, attempt)


def requeue_as_new_attempt(
    jobs: JobStore,
    redis: Redis,
    settings: Settings,
    record: JobRecord,
    message: str,
    *,
    level: str = "info",
    fenced: bool = True,
) -> JobRecord:
    """Send a job back to `queued` as its next attempt and queue that attempt for a trainer.

    The attempt number fences the previous one: it may still be running, but it can no longer change
    the job or publish. `fenced` checks that `record.attempt` is still the job's current attempt.
    """
    next_attempt = record.attempt + 1

    def bump(job: JobRecord) -> None:
        job.attempt = next_attempt

    queued = jobs.transition(
        record.id, JobState.QUEUED, message, level=level,
        expected_attempt=record.attempt if fenced else None, mutate=bump,
    )  # fmt: skip
    enqueue_training(
        redis, record.id, next_attempt, record.gpu_class, settings.train_timeout_seconds, record.num_nodes
    )
    return queued


def _retry_training(
    settings: Settings, redis: Redis, jobs: JobStore, job_id: str, attempt: int, reason: str
) -> None:
    record = jobs.require(job_id)
    if record.state is not JobState.RUNNING or record.attempt != attempt:
        return
    if attempt + 1 >= settings.max_attempts:
        message = f"The training process died ({reason}) on each of {attempt + 1} attempts; {KILLED_HINT}"
        jobs.transition(
            job_id, JobState.FAILED, message, level="error", expected_attempt=attempt,
            error=JobError(code="worker_died", message=message),
        )  # fmt: skip
        return
    message = (
        f"The training process died ({reason}); retrying as attempt {attempt + 2} of {settings.max_attempts}"
    )
    requeue_as_new_attempt(jobs, redis, settings, record, message, level="warn")


def _fail_standalone_evaluation(redis: Redis, evaluation_id: str, reason: str) -> None:
    message = f"The evaluation process died ({reason}); {KILLED_HINT}"

    def failed(record: EvaluationRecord) -> None:
        if record.status in ("queued", "running"):
            record.status, record.finished_at = "failed", now()
            record.error = JobError(code="evaluator_died", message=message)

    try:
        EvaluationStore(redis).update(evaluation_id, failed)
    except KeyError:
        log.info("no evaluation %s to mark failed", evaluation_id)


def _recover_preparation(settings: Settings, redis: Redis, job_id: str, reason: str) -> None:
    jobs = JobStore(redis, storage_from_settings(settings), settings.max_events_per_job)
    record = jobs.get(job_id)
    if record is None or record.state is not JobState.VALIDATING_FILES:
        return
    if reason == "signal 15":
        jobs.add_event(
            job_id, "Data preparation was stopped (its worker is shutting down); queued again", level="warn"
        )
        enqueue_preparation(redis, job_id, int(settings.estimate_timeout_seconds) * 10)
        return
    message = f"The data preparation process died ({reason}); {KILLED_HINT}"
    try:
        jobs.transition(
            job_id,
            JobState.FAILED,
            message,
            level="error",
            error=JobError(code="preparation_died", message=message),
        )
    except Exception:
        log.exception("could not fail %s", job_id)
