"""Finding work whose worker is gone, without relying on that worker or on a peer of it.

RQ notices a dead work horse only from its own parent, and abandoned tasks only from live workers
of the same queue; a trainer pod that dies with no peer (scale to zero) would leave its job
`running` forever. The janitor runs in every API process (one at a time, under a Redis lock): a
job whose task has stopped heartbeating is treated as a killed task (shared.recovery). A worker
wrongly declared lost is fenced: its attempt is no longer the job's, so it can publish nothing.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from shared.job_states import JobState
from shared.job_store import JobStore
from shared.queue import EVAL_TASK, TRAIN_TASK
from shared.recovery import recover_killed_task
from shared.settings import Settings

log = logging.getLogger(__name__)

LOCK_KEY = "tunery:janitor:lock"
TASKS = {JobState.RUNNING: ("train", TRAIN_TASK), JobState.EVALUATING: ("eval", EVAL_TASK)}


def sweep(settings: Settings, redis: Redis, jobs: JobStore) -> list[str]:
    """Recover every job whose task has been silent for longer than TUNERY_WORKER_LOST_AFTER_SECONDS.

    Returns the ids of the jobs it recovered. Does nothing when another process holds the lock.
    """
    if not redis.set(LOCK_KEY, "1", nx=True, ex=max(5, int(settings.janitor_interval_seconds))):
        return []
    recovered = []
    now = datetime.now(UTC)
    for record in jobs.active_jobs():
        if record.state not in TASKS:
            continue
        kind, func = TASKS[record.state]
        silent = _silent_seconds(redis, f"{record.id}-{kind}-{record.attempt}", now)
        if silent is None or silent < settings.worker_lost_after_seconds:
            continue
        log.warning("job %s: its %s task has been silent for %.0f s; recovering it", record.id, kind, silent)
        recover_killed_task(
            settings,
            redis,
            func,
            [record.id, record.attempt],
            f"worker lost: no heartbeat for {silent:.0f} s",
        )
        recovered.append(record.id)
    return recovered


def _silent_seconds(redis: Redis, task_id: str, now: datetime) -> float | None:
    """Seconds since the task's last sign of life; None while it is waiting in its queue."""
    try:
        task = Job.fetch(task_id, connection=redis, serializer=JSONSerializer)
    except NoSuchJobError:
        # The record says a worker has it, but RQ knows nothing of it: for a moment (a job enters its state
        # just before its task is queued) or for good. Silent since the janitor first saw it missing.
        key = f"tunery:janitor:missing:{task_id}"
        redis.set(key, now.timestamp(), nx=True, ex=7 * 24 * 3600)
        return now.timestamp() - float(redis.get(key) or now.timestamp())
    status = task.get_status(refresh=False)
    if status in ("queued", "deferred", "scheduled"):
        return None
    seen = task.last_heartbeat or task.started_at or task.enqueued_at
    if seen is None:
        return None
    return (now - seen.replace(tzinfo=UTC)).total_seconds()
