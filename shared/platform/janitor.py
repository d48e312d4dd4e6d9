"""Finding work whose worker is gone, without relying on that worker or on a peer of it.

RQ notices a dead work horse only from its own parent, and abandoned tasks only from live workers
of the same queue; a trainer pod that dies with no peer (scale to zero) would leave its job
`running` forever. The janitor runs in every API process (one at a time, under a Redis lock) and
looks at every job not yet finished, whatever its state: the task that should be moving it on
(its preparation, its training, its evaluation) must be waiting in a queue or heartbeating. A task
silent (or missing) for longer than TUNERY_WORKER_LOST_AFTER_SECONDS is a lost worker, a fault of
the platform: the job is recovered (shared.platform.recovery) without spending its own attempts. A worker
wrongly declared lost is fenced: its attempt is no longer the job's, so it can publish nothing.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from shared.platform.job_states import JobState
from shared.platform.job_store import JobStore
from shared.platform.queue import EVAL_TASK, PREPARE_TASK, TRAIN_TASK
from shared.platform.records import JobRecord
from shared.platform.recovery import recover_killed_task, requeue_lost_queued_task
from shared.platform.settings import Settings

log = logging.getLogger(__name__)

LOCK_KEY = "tunery:janitor:lock"


def sweep(settings: Settings, redis: Redis, jobs: JobStore, *, reachable_since: float = 0.0) -> list[str]:
    """Recover every job whose task has been silent for longer than TUNERY_WORKER_LOST_AFTER_SECONDS.

    Silence is counted from the last moment Redis became reachable at the earliest (`reachable_since`, a
    timestamp, and the Redis server's start): no worker can heartbeat through an outage, and a worker that
    rode it out must get the time to show itself again. Returns the ids of the jobs it recovered. Does
    nothing when another process holds the lock.
    """
    if not redis.set(LOCK_KEY, "1", nx=True, ex=max(5, int(settings.janitor_interval_seconds))):
        return []
    recovered = []
    now = datetime.now(UTC)
    redis_started = now.timestamp() - float(redis.info("server")["uptime_in_seconds"])
    since = datetime.fromtimestamp(max(reachable_since, redis_started), UTC)
    for record in jobs.active_jobs():
        task_id = expected_task_id(record)
        if task_id is None:
            continue
        silent = _silent_seconds(redis, task_id, now, since)
        if silent is None or silent < settings.worker_lost_after_seconds:
            continue
        reason = f"worker lost: no heartbeat for {silent:.0f} s (task {task_id})"
        log.warning("job %s (%s): %s; recovering it", record.id, record.state.value, reason)
        if record.state is JobState.QUEUED:
            requeue_lost_queued_task(settings, redis, jobs, record, reason)
        else:
            func, args = _TASKS[record.state](record)
            recover_killed_task(settings, redis, func, args, reason, infrastructure=True)
        recovered.append(record.id)
    return recovered


_TASKS = {
    JobState.VALIDATING_FILES: lambda record: (PREPARE_TASK, [record.id]),
    JobState.RUNNING: lambda record: (TRAIN_TASK, [record.id, record.attempt]),
    JobState.EVALUATING: lambda record: (EVAL_TASK, [record.id, record.attempt]),
}


def expected_task_id(record: JobRecord) -> str | None:
    """The RQ task that should be moving the job on in its state; None for a paused job (nothing runs)."""
    match record.state:
        case JobState.VALIDATING_FILES:
            return f"{record.id}-prepare"
        case JobState.QUEUED | JobState.RUNNING:
            return f"{record.id}-train-{record.attempt}"
        case JobState.EVALUATING:
            return f"{record.id}-eval-{record.attempt}"
    return None


def _silent_seconds(redis: Redis, task_id: str, now: datetime, since: datetime) -> float | None:
    """Seconds since the task's last sign of life (or `since`, if later); None while it waits in its queue."""
    try:
        task = Job.fetch(task_id, connection=redis, serializer=JSONSerializer)
    except NoSuchJobError:
        # The record says a worker has it, but RQ knows nothing of it: for a moment (a job enters its state
        # just before its task is queued) or for good. Silent since the janitor first saw it missing.
        key = f"tunery:janitor:missing:{task_id}"
        redis.set(key, now.timestamp(), nx=True, ex=7 * 24 * 3600)
        return now.timestamp() - max(float(redis.get(key) or now.timestamp()), since.timestamp())
    status = task.get_status(refresh=False)
    if status in ("queued", "deferred", "scheduled"):
        return None
    seen = task.last_heartbeat or task.started_at or task.enqueued_at
    if seen is None:
        return None
    return (now - max(seen.replace(tzinfo=UTC), since)).total_seconds()
