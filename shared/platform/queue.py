"""The RQ queues: their names, and how work is put on them.

RQ is only the delivery mechanism: the job record in Redis (shared.platform.job_store) is the truth, since
RQ deletes finished jobs after their result TTL. Tasks are named by import path so the API can
enqueue them without importing torch.
"""

from __future__ import annotations

import time

from redis import Redis
from rq import Queue, Worker
from rq.exceptions import InvalidJobOperation
from rq.job import Job, JobStatus
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
MODEL_FIT_TASK = "services.evaluator.prepare.model_fit"
STANDALONE_EVAL_TASK = "services.evaluator.standalone.run_standalone_evaluation"
# Smoke-test inference on fine-tuned models, served by `tunery inference` (one process that keeps models
# loaded between requests).
INFERENCE_QUEUE = "inference"
CHAT_COMPLETION_TASK = "services.inference.task.chat_completion"
CLASSIFICATION_TASK = "services.inference.task.classify"

# RQ's record of a finished task is only a delivery receipt: keep it briefly.
RESULT_TTL_SECONDS = 3600
FAILURE_TTL_SECONDS = 7 * 24 * 3600


def train_queue_name(gpu_class: str, num_nodes: int = 1) -> str:
    """`train:<class>`; a job on several nodes waits for a trainer group of that many nodes."""
    return f"train:{gpu_class}" if num_nodes == 1 else f"train:{gpu_class}:nodes-{num_nodes}"


def queue(redis: Redis, name: str) -> Queue:
    return Queue(name, connection=redis, serializer=JSONSerializer)


def enqueue_training(
    redis: Redis, job_id: str, attempt: int, gpu_class: str, timeout_seconds: int, num_nodes: int = 1
) -> None:
    queue(redis, train_queue_name(gpu_class, num_nodes)).enqueue_call(
        TRAIN_TASK,
        args=[job_id, attempt],
        job_id=f"{job_id}-train-{attempt}",
        timeout=timeout_seconds,
        result_ttl=RESULT_TTL_SECONDS,
        failure_ttl=FAILURE_TTL_SECONDS,
        description=f"train {job_id} (attempt {attempt})",
    )


def enqueue_standalone_evaluation(redis: Redis, evaluation_id: str, timeout_seconds: int) -> None:
    queue(redis, EVAL_QUEUE).enqueue_call(
        STANDALONE_EVAL_TASK,
        args=[evaluation_id],
        job_id=f"{evaluation_id}-run",
        timeout=timeout_seconds,
        result_ttl=RESULT_TTL_SECONDS,
        failure_ttl=FAILURE_TTL_SECONDS,
        description=f"evaluate {evaluation_id}",
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
    return _wait_for_result(task, timeout_seconds, "the estimate failed on the worker")


def run_inference(redis: Redis, task_name: str, spec: dict, timeout_seconds: float) -> dict | None:
    """Ask an inference worker for a chat completion or classifications and wait for the answer; None when
    no worker answered in time (the request is then withdrawn from the queue)."""
    task = queue(redis, INFERENCE_QUEUE).enqueue_call(
        task_name, args=[spec], timeout=int(timeout_seconds) + 60, result_ttl=60,
        ttl=max(1, int(timeout_seconds)), description="inference",
    )  # fmt: skip
    return _wait_for_result(task, timeout_seconds, "inference failed on the worker; see its log")


def withdraw_job_tasks(redis: Redis, job_id: str, attempt: int) -> list[str]:
    """Take a job's tasks still waiting in their queues out of them (its preparation, and its training
    and evaluation of every attempt up to `attempt`); returns their ids.

    A task a worker has already taken is left alone: it sees the job's state itself. Removing the id
    from the queue's list comes first, so a task is either withdrawn or taken, never both.
    """
    ids = [f"{job_id}-prepare"]
    ids += [f"{job_id}-{kind}-{n}" for n in range(attempt + 1) for kind in ("train", "eval")]
    withdrawn = []
    for task in Job.fetch_many(ids, connection=redis, serializer=JSONSerializer):
        if task is not None and queue(redis, task.origin).remove(task.id):
            task.delete(remove_from_queue=False)
            withdrawn.append(task.id)
    return withdrawn


def listening_workers(redis: Redis, name: str) -> int:
    """How many workers are registered on a queue (a worker killed outright stays listed until its TTL)."""
    return Worker.count(connection=redis, queue=queue(redis, name))


def _wait_for_result(task: Job, timeout_seconds: float, failure: str) -> dict | None:
    """Poll a task until it finishes; a failed task becomes an `internal_error`, and a task still waiting
    at the deadline is cancelled and None returned."""
    deadline = time.monotonic() + timeout_seconds
    try:
        while time.monotonic() < deadline:
            status = task.get_status(refresh=True)
            if status == JobStatus.FINISHED:
                return task.return_value(refresh=True)
            if status == JobStatus.FAILED:
                return {"error": {"code": "internal_error", "message": failure, "param": None}}
            time.sleep(0.05)
        task.cancel()
    except InvalidJobOperation:  # its ttl (the timeout) ran out with no worker taking it: RQ deleted it
        pass
    return None
