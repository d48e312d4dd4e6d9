"""Cancelling a job: its state first, then its waiting tasks.

The state change is what every running stage obeys (the trainer at its next step, the evaluator at its
next forward pass, data preparation before it queues the job). A task still waiting in a queue would
only be skipped once some worker took it: until then it holds a place in the queue and counts in
`tunery_queue_depth`, and with no worker of its kind (scale to zero) it would stay forever. So a cancel
also withdraws them, and whoever queues a task for a job checks afterwards that the job was not
cancelled meanwhile (`withdraw_if_cancelled`).
"""

from __future__ import annotations

from redis import Redis

from shared.platform.job_states import JobState
from shared.platform.job_store import JobStore
from shared.platform.queue import withdraw_job_tasks
from shared.platform.records import JobRecord


def cancel(jobs: JobStore, redis: Redis, job_id: str, message: str) -> JobRecord:
    """Move the job to `cancelled` (IllegalTransition when it has finished) and withdraw its waiting
    tasks."""
    record = jobs.transition(job_id, JobState.CANCELLED, message)
    withdraw_job_tasks(redis, job_id, record.attempt)
    return record


def withdraw_if_cancelled(jobs: JobStore, redis: Redis, job_id: str) -> bool:
    """After queuing a task for the job: withdraw it if the job was cancelled in between (its cancel
    found nothing to withdraw yet). True when the job is cancelled."""
    record = jobs.get(job_id)
    if record is None or record.state is not JobState.CANCELLED:
        return False
    withdraw_job_tasks(redis, job_id, record.attempt)
    return True
