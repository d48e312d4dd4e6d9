"""The RQ queues: their names, and how work is put on them.

RQ is only the delivery mechanism: the job record in Redis (shared.job_store) is the truth, since
RQ deletes finished jobs after their result TTL. Tasks are named by import path so the API can
enqueue them without importing torch.
"""

from __future__ import annotations

import time

from redis import Redis
from rq import Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer

EVAL_QUEUE = "eval"
# Data preparation (validating_files) and estimates, served by evaluator workers (CPU, transformers).
PREPARE_QUEUE = "prepare"
# What an evaluator serves by default; the first is served first (a user waits on it).
EVALUATOR_QUEUES = (PREPARE_QUEUE, EVAL_QUEUE)
TRAIN_TASK = "services.trainer.task.run_training"
EVAL_TASK = "services.evaluator.task.run_evaluation"
PREPARE_TASK = "services.evaluator.prepare.prepare_job"
ESTIMATE_TASK = "services.evaluator.prepare.estimate_request"
TOKEN_REPORT_TASK = "services.evaluator.prepare.token_report"

# RQ's record of a finished task is only a delivery receipt: keep it briefly.
RESULT_TTL_SECONDS = 3600
FAILURE_TTL_SECONDS = 7 * 24 * 3600


def train_queue_name(gpu_class: str) -> str:
    return f"train:{gpu_class}"


def queue(redis: Redis, name: str) -> Queue:
    return Queue(name, connection=redis, serializer=JSONSerializer)


def enqueue_training(redis: Redis, job_id: str, attempt: int, gpu_class: str, timeout_seconds: int) -> None:
    queue(redis, train_queue_name(gpu_class)).enqueue_call(
        TRAIN_TASK,
        args=[job_id, attempt],
        job_id=f"{job_id}-train-{attempt}",
        timeout=timeout_seconds,
        result_ttl=RESULT_TTL_SECONDS,
        failure_ttl=FAILURE_TTL_SECONDS,
        description=f"train {job_id} (attempt {attempt})",
    )


def enqueue_evaluation(redis: Redis, job_id: str, attempt: int, timeout_seconds: int) -> None:
    queue(redis, EVAL_QUEUE).enqueue_call(
        EVAL_TASK,
        args=[job_id, attempt],
        job_id=f"{job_id}-eval-{attempt}",
        timeout=timeout_seconds,
        result_ttl=RESULT_TTL_SECONDS,
        failure_ttl=FAILURE_TTL_SECONDS,
        description=f"evaluate {job_id} (attempt {attempt})",
    )


def enqueue_preparation(redis: Redis, job_id: str, timeout_seconds: int) -> None:
    queue(redis, PREPARE_QUEUE).enqueue_call(
        PREPARE_TASK,
        args=[job_id],
        job_id=f"{job_id}-prepare",
        timeout=timeout_seconds,
        result_ttl=RESULT_TTL_SECONDS,
        failure_ttl=FAILURE_TTL_SECONDS,
        description=f"prepare {job_id}",
    )


def run_estimate(
    redis: Redis, spec: dict, timeout_seconds: float, task_name: str = ESTIMATE_TASK
) -> dict | None:
    """Ask an evaluator for an estimate (or a file's token report) and wait for it; None when no worker
    answered in time."""
    task = queue(redis, PREPARE_QUEUE).enqueue_call(
        task_name, args=[spec], timeout=int(timeout_seconds) + 60, result_ttl=600, ttl=int(timeout_seconds),
        at_front=True, description="estimate",
    )  # fmt: skip
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        status = task.get_status(refresh=True)
        if status == JobStatus.FINISHED:
            return task.return_value(refresh=True)
        if status == JobStatus.FAILED:
            return {
                "error": {
                    "code": "internal_error",
                    "message": "the estimate failed on the worker",
                    "param": None,
                }
            }
        time.sleep(0.05)
    task.cancel()
    return None
