"""What happens to a job whose task died: its work horse was killed (OOM killer, SIGKILL, a crash in
native code), or its whole worker was lost (node gone, pod killed, worker SIGKILLed: the janitor finds it).

Also the one way a job goes back to its queue as a new attempt (`requeue_as_new_attempt`): after
a preemption, a resume, or a killed or lost worker.

A training attempt goes back to the queue as a new attempt and carries on from its last checkpoint;
an evaluation is queued again. Two budgets bound the retries: a death of the job's own process
(`infrastructure=False`: most often out of memory) counts against `TUNERY_MAX_ATTEMPTS`, then the job
fails with an error that says what to try; a fault of the platform (`infrastructure=True`: a lost
worker, a horse killed by its own worker's stop) counts against `TUNERY_MAX_INFRASTRUCTURE_RETRIES`,
so that a healthy job does not pay for a node that went away. A standalone evaluation (POST
/v1/evaluations) fails. A data preparation is queued again after a stop or a lost worker; one whose
own process died otherwise fails its job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from redis import Redis

from shared.platform.cancel import withdraw_if_cancelled
from shared.platform.evaluation_store import EvaluationStore
from shared.platform.job_states import JobState
from shared.platform.job_store import JobNotFound, JobStore, StaleAttempt
from shared.platform.queue import (
    EVAL_TASK,
    PREPARE_TASK,
    STANDALONE_EVAL_TASK,
    TRAIN_TASK,
    enqueue_evaluation,
    enqueue_preparation,
    enqueue_training,
)
from shared.platform.records import EvaluationRecord, JobError, JobRecord, now
from shared.platform.settings import Settings
from shared.platform.storage import storage_from_settings

log = logging.getLogger(__name__)

KILLED_HINT = "if it ran out of memory, lower batch_size or max_seq_length, or use a larger GPU class"


def recover_killed_task(
    settings: Settings, redis: Redis, func_name: str, args: list, reason: str, *, infrastructure: bool = False
) -> None:
    """Retry (or fail) the job of a task that died; `infrastructure` when the platform, not the job's own
    process, is to blame."""
    if func_name == STANDALONE_EVAL_TASK and len(args) == 1:
        _fail_standalone_evaluation(redis, str(args[0]), reason)
        return
    if func_name == PREPARE_TASK and len(args) == 1:
        _recover_preparation(settings, redis, str(args[0]), reason, infrastructure)
        return
    if func_name not in (TRAIN_TASK, EVAL_TASK) or len(args) != 2:
        return
    job_id, attempt = str(args[0]), int(args[1])
    jobs = JobStore(redis, storage_from_settings(settings), settings.max_events_per_job)
    try:
        if func_name == TRAIN_TASK:
            _retry_training(settings, redis, jobs, job_id, attempt, reason, infrastructure)
        else:
            _retry_evaluation(settings, redis, jobs, job_id, attempt, reason, infrastructure)
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
    count: Callable[[JobRecord], None] | None = None,
) -> JobRecord:
    """Send a job back to `queued` as its next attempt and queue that attempt for a trainer.

    The attempt number fences the previous one: it may still be running, but it can no longer change
    the job or publish. `fenced` checks that `record.attempt` is still the job's current attempt;
    `count` books the retry against one of the job's budgets.
    """
    next_attempt = record.attempt + 1

    def bump(job: JobRecord) -> None:
        job.attempt = next_attempt
        if count is not None:
            count(job)

    queued = jobs.transition(
        record.id, JobState.QUEUED, message, level=level,
        expected_attempt=record.attempt if fenced else None, mutate=bump,
    )  # fmt: skip
    enqueue_training(
        redis, record.id, next_attempt, record.gpu_class, settings.train_timeout_seconds, record.num_nodes
    )
    withdraw_if_cancelled(jobs, redis, record.id)
    return queued


def requeue_lost_queued_task(
    settings: Settings, redis: Redis, jobs: JobStore, record: JobRecord, reason: str
) -> None:
    """A queued job whose training task vanished from its queue, or whose worker was lost before it
    started training: queue it again as a new attempt (fencing a worker that may yet wake up)."""
    if _ended_if_exhausted(settings, jobs, record, "training", reason, infrastructure=True):
        return
    next_attempt = record.attempt + 1
    count = _counter(infrastructure=True)

    def bump(job: JobRecord) -> None:
        job.attempt = next_attempt
        count(job)

    jobs.update(record.id, bump, expected_attempt=record.attempt)
    jobs.add_event(record.id, f"Its training task was lost ({reason}); queued again", level="warn")
    enqueue_training(
        redis, record.id, next_attempt, record.gpu_class, settings.train_timeout_seconds, record.num_nodes
    )
    withdraw_if_cancelled(jobs, redis, record.id)


def _retry_training(
    settings: Settings,
    redis: Redis,
    jobs: JobStore,
    job_id: str,
    attempt: int,
    reason: str,
    infrastructure: bool,
) -> None:
    record = jobs.require(job_id)
    if record.state is not JobState.RUNNING or record.attempt != attempt:
        return
    if _ended_if_exhausted(settings, jobs, record, "training", reason, infrastructure):
        return
    budget = _budget_left(settings, record, infrastructure)
    message = f"The training process died ({reason}); retrying as attempt {attempt + 2}{budget}"
    requeue_as_new_attempt(
        jobs, redis, settings, record, message, level="warn", count=_counter(infrastructure)
    )


def _retry_evaluation(
    settings: Settings,
    redis: Redis,
    jobs: JobStore,
    job_id: str,
    attempt: int,
    reason: str,
    infrastructure: bool,
) -> None:
    """Evaluate the same trained attempt again: the adapter is stored, only the comparison is redone."""
    record = jobs.require(job_id)
    if record.state is not JobState.EVALUATING or record.attempt != attempt:
        return
    if _ended_if_exhausted(settings, jobs, record, "evaluation", reason, infrastructure):
        return
    jobs.update(job_id, _counter(infrastructure), expected_attempt=attempt)
    budget = _budget_left(settings, record, infrastructure)
    jobs.add_event(job_id, f"The evaluation process died ({reason}); evaluating again{budget}", level="warn")
    enqueue_evaluation(redis, job_id, attempt, settings.eval_timeout_seconds)
    withdraw_if_cancelled(jobs, redis, job_id)


def _ended_if_exhausted(
    settings: Settings, jobs: JobStore, record: JobRecord, what: str, reason: str, infrastructure: bool
) -> bool:
    """Fail the job when the budget this death counts against is spent; True if it did."""
    failure = _exhausted(settings, record, what, reason, infrastructure)
    if failure is not None:
        jobs.transition(
            record.id, JobState.FAILED, failure.message, level="error", expected_attempt=record.attempt,
            error=failure,
        )  # fmt: skip
    return failure is not None


def _exhausted(
    settings: Settings, record: JobRecord, what: str, reason: str, infrastructure: bool
) -> JobError | None:
    """The error that ends the job when the budget this death counts against is spent, else None."""
    if infrastructure:
        if record.infrastructure_retries < settings.max_infrastructure_retries:
            return None
        message = (
            f"The {what} process was lost ({reason}) {record.infrastructure_retries + 1} times; "
            "check the health of the workers and their nodes"
        )
        return JobError(code="worker_lost", message=message)
    if record.failed_attempts + 1 < settings.max_attempts:
        return None
    code = "worker_died" if what == "training" else "evaluator_died"
    attempts = record.failed_attempts + 1
    return JobError(
        code=code, message=f"The {what} process died ({reason}) on each of {attempts} attempts; {KILLED_HINT}"
    )


def _budget_left(settings: Settings, record: JobRecord, infrastructure: bool) -> str:
    if infrastructure:
        return "; a fault of the platform, not counted against the job"
    return f"; {record.failed_attempts + 1} of the job's {settings.max_attempts} allowed failures used"


def _counter(infrastructure: bool) -> Callable[[JobRecord], None]:
    def count(job: JobRecord) -> None:
        if infrastructure:
            job.infrastructure_retries += 1
        else:
            job.failed_attempts += 1

    return count


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


def _recover_preparation(
    settings: Settings, redis: Redis, job_id: str, reason: str, infrastructure: bool
) -> None:
    jobs = JobStore(redis, storage_from_settings(settings), settings.max_events_per_job)
    record = jobs.get(job_id)
    if record is None or record.state is not JobState.VALIDATING_FILES:
        return
    if infrastructure or reason == "signal 15":
        jobs.add_event(job_id, f"Data preparation was interrupted ({reason}); queued again", level="warn")
        enqueue_preparation(redis, job_id, int(settings.estimate_timeout_seconds) * 10)
        withdraw_if_cancelled(jobs, redis, job_id)
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
