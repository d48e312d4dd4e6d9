"""Standalone evaluations (POST /v1/evaluations): any model of the catalog, or any fine-tuned model, on any
validation file of the tenant.

A fine-tuned model is scored exactly as its job's own evaluation scores it (base and fine-tuned side by
side, per group, with a verdict), on the given file instead of the job's held-out rows. A catalog chat
model is scored alone. The report is stored under the evaluation's prefix and on its record.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from services.evaluator import task as job_evaluation
from shared.platform import storage_keys
from shared.platform.evaluation_store import EvaluationStore
from shared.platform.failures import JobFailure, classify
from shared.platform.records import EvaluationRecord, JobRecord, now
from shared.platform.runtime import Runtime, connect

log = logging.getLogger(__name__)


def run_standalone_evaluation(evaluation_id: str) -> str:
    """RQ entry point."""
    runtime = connect()
    evaluations = EvaluationStore(runtime.redis)
    evaluation = evaluations.get(evaluation_id)
    if evaluation is None or evaluation.status != "queued":
        return f"skipped ({evaluation.status if evaluation else 'missing'})"

    def running(record: EvaluationRecord) -> None:
        record.status = "running"

    evaluations.update(evaluation_id, running)
    try:
        report = _evaluate(runtime, evaluation)
    except Exception as exc:
        error, expected = classify(exc)

        def failed(record: EvaluationRecord) -> None:
            record.status, record.error, record.finished_at = "failed", error, now()

        evaluations.update(evaluation_id, failed)
        if not expected:
            raise
        return f"failed: {error.code}"
    key = storage_keys.evaluation_prefix(evaluation.tenant, evaluation.id) + "report.json"
    runtime.storage.put_bytes(key, json.dumps(report, indent=2).encode())

    def succeeded(record: EvaluationRecord) -> None:
        record.status, record.report, record.finished_at = "succeeded", report, now()

    evaluations.update(evaluation_id, succeeded)
    return "succeeded"


def _evaluate(runtime: Runtime, evaluation: EvaluationRecord) -> dict[str, Any]:
    settings, redis, storage = runtime.settings, runtime.redis, runtime.storage
    options = {"generation_rows": evaluation.generation_rows, "group_field": evaluation.group_field}
    if evaluation.fine_tuning_job is None:
        return job_evaluation.evaluate_base_model(
            settings,
            redis,
            storage,
            evaluation.tenant,
            evaluation.model,
            evaluation.validation_file,
            **options,
        )
    job = runtime.jobs.get(evaluation.fine_tuning_job, evaluation.tenant)
    if job is None:
        raise JobFailure("model_not_found", f"the job that made {evaluation.model} no longer exists", "model")
    # The job as it would be evaluated with this file as its validation file.
    record: JobRecord = job.model_copy(update={"validation_file": evaluation.validation_file})
    generations = storage_keys.evaluation_prefix(evaluation.tenant, evaluation.id) + "generations.jsonl"
    # By the evaluator of the job's method, as the job's own evaluation.
    return job_evaluation.evaluate_job(
        settings, redis, storage, record, generations_key=generations, **options
    )
