"""The RQ queues: their names, and how work is put on them.

RQ is only the delivery mechanism: the job record in Redis (shared.job_store) is the truth, since
RQ deletes finished jobs after their result TTL. Tasks are named by import path so the API can
enqueue them without importing torch.
"""

from __future__ import annotations

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

EVAL_QUEUE = "eval"
TRAIN_TASK = "services.trainer.task.run_training"
EVAL_TASK = "services.evaluator.task.run_evaluation"

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


def queue_depths(redis: Redis, names: list[str]) -> dict[str, int]:
    return {name: queue(redis, name).count for name in names}
