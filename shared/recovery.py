"""What happens to a job whose work horse was killed (OOM killer, SIGKILL, a crash in native code).

Also the one way a job goes back to its queue as a new attempt (`requeue_as_new_attempt`): after
a preemption, a resume, or a killed or lost worker.

The RQ worker survives its work horse and calls `recover_killed_task` for the task it ran. A
training attempt goes back to the queue as a new attempt, until the job has used its attempts;
then the job fails with an error that says what to try. An evaluation fails the job at once:
it holds nothing worth retrying blindly.
"""

from __future__ import annotations

import logging

from redis import Redis

from shared.job_states import JobState
from shared.job_store import JobNotFound, JobStore, StaleAttempt
from shared.queue import EVAL_TASK, TRAIN_TASK, enqueue_training
from shared.records import JobError, JobRecord
from shared.settings import Settings
from shared.storage import storage_from_settings

log = logging.getLogger(__name__)

KILLED_HINT = "if it ran out of memory, lower batch_size or max_seq_length, or use a larger GPU class"


def recover_killed_task(settings: Settings, redis: Redis, func_name: str, args: list, reason: str) -> None:
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
    enqueue_training(redis, record.id, next_attempt, record.gpu_class, settings.train_timeout_seconds)
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
