"""/v1/evaluations: measure any catalog model or fine-tuned model on any validation file, on its own.

The evaluator does the work (as it does at the end of every job); the API records the request, queues it
and shows its state and report. A fine-tuned model is measured against its base model, with a verdict; a
catalog chat model alone.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from services.api.auth import caller_tenant
from services.api.context import Context, get_context
from services.api.errors import FILE_NOT_READY_RESPONSE, APIError, file_not_ready, not_found
from services.api.schemas import Evaluation, EvaluationCreate, EvaluationList, list_object
from shared.methods import DEFAULT_METHOD, method
from shared.platform.evaluation_store import EvaluationStore
from shared.platform.ids import new_id
from shared.platform.queue import enqueue_standalone_evaluation
from shared.platform.records import EvaluationRecord, now

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"])


def evaluation_object(record: EvaluationRecord) -> dict:
    return {
        "id": record.id,
        "object": "evaluation",
        "created_at": record.created_at,
        "model": record.model,
        "validation_file": record.validation_file,
        "fine_tuning_job": record.fine_tuning_job,
        "group_field": record.group_field,
        "generation_rows": record.generation_rows,
        "metadata": record.metadata,
        "status": record.status,
        "report": record.report,
        "error": record.error.model_dump() if record.error else None,
        "finished_at": record.finished_at,
    }


def _method_of(ctx: Context, tenant: str, model: str) -> tuple[str, str | None]:
    """What `model` was trained for, and the job that made it (None for a catalog model, which is evaluated
    alone as a chat model: on the data of the default method)."""
    if model in ctx.catalog:
        if DEFAULT_METHOD not in ctx.catalog[model].tasks:
            raise APIError(
                400, f"model: {model} is not a chat model; evaluate a model fine-tuned from it instead",
                code="model_not_evaluable", param="model",
            )  # fmt: skip
        return DEFAULT_METHOD, None
    job_id = ctx.jobs.job_of_fine_tuned_model(tenant, model)
    job = ctx.jobs.get(job_id, tenant) if job_id else None
    if job is None:
        raise not_found("model", model, param="model")
    return job.method_type, job.id


@router.post(
    "",
    summary="Evaluate a model on a validation file",
    response_model=Evaluation,
    responses={
        **FILE_NOT_READY_RESPONSE,
        404: {"description": "No such model for the caller's organization"},
    },
    description=(
        "Queues an evaluation of `model` (a catalog chat model, or a fine-tuned model of your organization) "
        "on `validation_file`. A fine-tuned model is scored beside its base model on the same rows (loss, "
        "perplexity, token accuracy, generation metrics, per group, and a verdict), as a job's own "
        "evaluation is; a catalog model alone. Poll GET /v1/evaluations/{id} for the report."
    ),
)
def create_evaluation(
    body: EvaluationCreate, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> dict:
    method_type, job_id = _method_of(ctx, tenant, body.model)
    file = ctx.files.get(body.validation_file, tenant)
    if file is None:
        raise APIError(
            400, f"validation_file {body.validation_file} does not exist", code="file_not_found",
            param="validation_file",
        )  # fmt: skip
    if file.status == "uploaded":
        raise file_not_ready(file.id, "validation_file")
    data_kind = method(method_type).data_kind
    if file.status != "processed" or file.task != data_kind.name:
        raise APIError(
            400, f"validation_file {file.id} holds {file.format or 'unusable'} data; evaluating {body.model} "
            f"needs {data_kind.help}",
            code="unsupported_data_for_method", param="validation_file",
        )  # fmt: skip
    record = EvaluationRecord(
        id=new_id("eval"), tenant=tenant, created_at=now(), model=body.model, validation_file=file.id,
        fine_tuning_job=job_id, group_field=body.group_field, generation_rows=body.generation_rows,
        metadata=body.metadata,
    )  # fmt: skip
    EvaluationStore(ctx.redis).create(record)
    enqueue_standalone_evaluation(ctx.redis, record.id, ctx.settings.eval_timeout_seconds)
    return evaluation_object(record)


@router.get("", summary="List evaluations (newest first)", response_model=EvaluationList)
def list_evaluations(
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ctx: Context = Depends(get_context),
    tenant: str = Depends(caller_tenant),
) -> dict:
    records, has_more = EvaluationStore(ctx.redis).list(tenant, after=after, limit=limit)
    return list_object([evaluation_object(r) for r in records], has_more)


@router.get("/{evaluation_id}", summary="Retrieve an evaluation", response_model=Evaluation)
def retrieve_evaluation(
    evaluation_id: str, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> dict:
    record = EvaluationStore(ctx.redis).get(evaluation_id, tenant)
    if record is None:
        raise not_found("evaluation", evaluation_id)
    return evaluation_object(record)
