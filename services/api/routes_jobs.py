"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, and list a job's events."""

from __future__ import annotations

import json
import re
import secrets
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials

from services.api.archive import tar_stream
from services.api.auth import authenticate_reading, bearer, caller_tenant
from services.api.context import Context, get_context
from services.api.errors import FILE_NOT_READY_RESPONSE, APIError, file_not_ready, not_found
from services.api.idempotency import create_once
from services.api.schemas import (
    CheckpointList,
    EventList,
    FineTuningJob,
    JobCreate,
    JobList,
    job_object,
    list_object,
)
from shared.data.splits import holdout_seed
from shared.methods import DEFAULT_METHOD, METHODS, NAMES, method
from shared.platform import storage_keys
from shared.platform.cancel import cancel
from shared.platform.ids import new_job_id
from shared.platform.job_states import JobState, is_terminal
from shared.platform.job_store import owned_record, record_key
from shared.platform.queue import enqueue_preparation, run_estimate
from shared.platform.records import Budget, FileRecord, JobRecord, LoraSettings, now
from shared.platform.recovery import requeue_as_new_attempt

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


def _usable_file(ctx: Context, tenant: str, file_id: str, param: str, method_type: str) -> FileRecord:
    record = ctx.files.get(file_id, tenant)
    if record is None:
        raise APIError(400, f"{param} {file_id} does not exist", code="file_not_found", param=param)
    if record.purpose != "fine-tune":
        raise APIError(400, f"{param} {file_id} has purpose {record.purpose!r}, not 'fine-tune'", param=param)
    if record.status == "uploaded":
        raise file_not_ready(file_id, param)
    if record.status != "processed":
        raise APIError(
            400,
            f"{param} {file_id} is invalid: {record.status_details}",
            code=f"invalid_{param}",
            param=param,
        )
    data_kind = method(method_type).data_kind
    if record.task != data_kind.name:
        raise APIError(
            400,
            f"{param} {file_id} holds {record.format} data ({record.task}); method {method_type} needs "
            f"{data_kind.help}",
            code="unsupported_data_for_method",
            param=param,
        )
    return record


def _check_method(ctx: Context, body: JobCreate) -> None:
    """The method's own rules: a model that can learn it, its hyperparameters where it reads them, and
    the options it supports."""
    method_type = body.method_type
    trained = method(method_type)
    entry = ctx.catalog[body.model]
    if method_type not in entry.tasks:
        raise APIError(
            400, f"model {body.model!r} can be trained for {', '.join(entry.tasks)} only, not method "
            f"{method_type} (see the tasks of GET /v1/models)",
            code="unsupported_method_for_model", param="model",
        )  # fmt: skip
    if body.method is not None:
        for other in NAMES:
            if other != method_type and getattr(body.method, other) is not None:
                raise APIError(
                    400, f"method.{other} was given, but method.type is {method_type!r}; put the hyperparameters "
                    f"under method.{method_type}",
                    code="invalid_request", param=f"method.{other}",
                )  # fmt: skip
    if method_type != DEFAULT_METHOD and body.hyperparameters is not None:
        raise APIError(
            400, f"the top-level hyperparameters are for {DEFAULT_METHOD} jobs; give them under "
            f"method.{method_type}.hyperparameters", code="invalid_request", param="hyperparameters",
        )  # fmt: skip
    if not trained.learning_rate_sweep and body.learning_rate_sweep is not None:
        sweeping = " and ".join(m.name for m in METHODS.values() if m.learning_rate_sweep)
        raise APIError(
            400, f"learning-rate sweeps are available for {sweeping} jobs only, not method {method_type}",
            code="invalid_request", param="learning_rate_sweep",
        )  # fmt: skip
    if trained.serves == "classification" and body.export_merged:
        raise APIError(
            400, "export_merged merges a causal LM's adapter into its weights; a classifier is exported as it was "
            "trained (its model or adapter, tokenizer and labels)",
            code="invalid_request", param="export_merged",
        )  # fmt: skip


def _check_request(ctx: Context, tenant: str, body: JobCreate) -> tuple[str, int]:
    """Refuse what can be refused at once (unknown model or class, unusable files); the GPU class and the
    held-out split's seed (shared.data.splits.holdout_seed)."""
    if body.model not in ctx.catalog:
        raise APIError(
            400,
            f"model {body.model!r} is not in this server's catalog (see GET /v1/models)",
            code="model_not_found",
            param="model",
        )
    gpu_class = body.gpu_class or ctx.settings.gpu_class
    if gpu_class not in ctx.gpu_classes:
        raise APIError(
            400,
            f"gpu_class {gpu_class!r} is not configured; choose one of {', '.join(sorted(ctx.gpu_classes))}",
            code="gpu_class_not_found",
            param="gpu_class",
        )
    devices = ctx.gpu_classes[gpu_class].devices_per_node
    if body.num_gpus > devices:
        raise APIError(
            400, f"num_gpus {body.num_gpus} is more than gpu_class {gpu_class!r} has per node ({devices})",
            code="invalid_num_gpus", param="num_gpus",
        )  # fmt: skip
    if body.hub_repo and not ctx.settings.hf_token:
        raise APIError(
            400, "hub_repo: this server has no Hugging Face token (TUNERY_HF_TOKEN) to publish with",
            code="hub_unavailable", param="hub_repo",
        )  # fmt: skip
    if gpu_class == "cpu" and body.distributed != "ddp":
        raise APIError(
            400, f"distributed {body.distributed!r} needs GPUs; processes of the cpu class use ddp (gloo)",
            code="invalid_distributed", param="distributed",
        )  # fmt: skip
    if body.integrations:
        raise APIError(400, "integrations are not supported", param="integrations")
    _check_method(ctx, body)
    training = _usable_file(ctx, tenant, body.training_file, "training_file", body.method_type)
    if body.validation_file is not None:
        _usable_file(ctx, tenant, body.validation_file, "validation_file", body.method_type)
    return gpu_class, holdout_seed(body.seed, training.sha256)


def _create_job(ctx: Context, tenant: str, body: JobCreate) -> JobRecord:
    gpu_class, split_seed = _check_request(ctx, tenant, body)
    record = JobRecord(
        id=new_job_id(),
        tenant=tenant,
        created_at=now(),
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        holdout_seed=split_seed,
        suffix=body.suffix,
        metadata=body.metadata,
        method_type=body.method_type,
        requested_hyperparameters=body.requested_hyperparameters(),
        lora=body.lora or LoraSettings(),
        gpu_class=gpu_class,
        budget=Budget(max_cost_usd=body.max_cost_usd, max_duration_seconds=body.max_duration_seconds),
        learning_rate_sweep=body.learning_rate_sweep,
        data_policy=body.data_policy,
        export_merged=body.export_merged,
        num_gpus=body.num_gpus,
        num_nodes=body.num_nodes,
        distributed=body.distributed,
        checkpoint_every_steps=body.checkpoint_every_steps,
        checkpoint_every_seconds=body.checkpoint_every_seconds,
        hub_repo=body.hub_repo,
    )
    limit = ctx.settings.max_active_jobs_per_tenant
    if ctx.jobs.active_count(tenant) >= limit:
        raise APIError(
            429,
            f"your organization already has {limit} jobs queued or running (TUNERY_MAX_ACTIVE_JOBS_PER_TENANT); "
            "wait for one to finish or cancel one",
            code="too_many_active_jobs",
            headers={"retry-after": "60"},
        )
    # validating_files: an evaluator tokenizes the data with the model's template, resolves every
    # "auto" and estimates the job, then queues it for training (services/evaluator/prepare.py).
    ctx.jobs.create(record, f"Created fine-tuning job {record.id}; validating files")
    enqueue_preparation(ctx.redis, record.id, int(ctx.settings.estimate_timeout_seconds) * 10)
    return record


@router.post(
    "/estimate",
    summary="Estimate a fine-tuning job without creating it",
    description=(
        "Takes the body of a job creation. Answers the resolved hyperparameters with a reason each, "
        "the token count, optimizer steps, peak memory per device and whether it fits each GPU class, "
        "and the expected duration and cost per GPU class. Computed by an evaluator worker with the "
        "model's own tokenizer; 503 when none answers in TUNERY_ESTIMATE_TIMEOUT_SECONDS."
    ),
)
def estimate_job(
    body: JobCreate, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> dict:
    gpu_class, split_seed = _check_request(ctx, tenant, body)
    spec = {
        "tenant": tenant,
        "model": body.model,
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "seed": body.seed if body.seed is not None else 0,
        "holdout_seed": split_seed,
        "method_type": body.method_type,
        "requested": body.requested_hyperparameters(),
        "lora": (body.lora or LoraSettings()).model_dump(),
        "processes": body.num_gpus * body.num_nodes,
        "gpu_class": gpu_class,
        "data_policy": body.data_policy,
    }
    result = run_estimate(ctx.redis, spec, ctx.settings.estimate_timeout_seconds)
    if result is None:
        raise APIError(
            503, "no evaluator worker answered in time to compute the estimate; retry later", code="no_worker",
            headers={"retry-after": "10"},
        )  # fmt: skip
    if "error" in result:
        error = result["error"]
        raise APIError(400, error["message"], code=error["code"], param=error.get("param"))
    return {"object": "fine_tuning.job.estimate", "gpu_class": gpu_class, **result}


@router.post(
    "", summary="Create a fine-tuning job", response_model=FineTuningJob, responses=FILE_NOT_READY_RESPONSE
)
async def create_job(
    body: JobCreate,
    request: Request,
    ctx: Context = Depends(get_context),
    tenant: str = Depends(caller_tenant),
    idempotency_key: Annotated[
        str | None, Header(description="Replays of a key return the job the first request created (24 h).")
    ] = None,
) -> dict:
    raw = await request.body()

    def create() -> str:
        return _create_job(ctx, tenant, body).id

    job_id = await run_in_threadpool(create_once, ctx.redis, request, tenant, "job", raw, create)
    return job_object(await run_in_threadpool(_require_job, ctx, tenant, job_id))


@router.get(
    "",
    summary="List fine-tuning jobs (newest first)",
    response_model=JobList,
    description="Filter by metadata with query parameters `metadata[key]=value` (all must match).",
)
def list_jobs(
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ctx: Context = Depends(get_context),
    tenant: str = Depends(caller_tenant),
) -> dict:
    metadata = {
        name[len("metadata[") : -1]: value
        for name, value in request.query_params.multi_items()
        if name.startswith("metadata[") and name.endswith("]")
    }
    records, has_more = ctx.jobs.list(tenant, after=after, limit=limit, metadata=metadata)
    return list_object([job_object(r) for r in records], has_more)


def _require_job(ctx: Context, tenant: str, job_id: str) -> JobRecord:
    record = ctx.jobs.get(job_id, tenant)
    if record is None:
        raise not_found("fine-tuning job", job_id)
    return record


@router.get("/{job_id}", summary="Retrieve a fine-tuning job", response_model=FineTuningJob)
async def retrieve_job(
    job_id: str,
    credentials: HTTPAuthorizationCredentials | None = Security(bearer),
    ctx: Context = Depends(get_context),
) -> JSONResponse:
    """The hottest read (clients poll it): the key check and the record in one Redis round trip on the
    event loop, and the JSON built once from the validated record (`response_model` still describes it)."""
    caller, (raw,) = await authenticate_reading(ctx, credentials, [record_key(job_id)])
    record = owned_record(raw, caller.tenant)
    if record is None:
        raise not_found("fine-tuning job", job_id)
    return JSONResponse(job_object(record))


@router.post("/{job_id}/cancel", summary="Cancel a fine-tuning job", response_model=FineTuningJob)
def cancel_job(
    job_id: str, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> dict:
    record = _require_job(ctx, tenant, job_id)
    if is_terminal(record.state):
        # 400, not 409: the openai SDK retries 409s, and retrying cannot change a finished job.
        raise APIError(
            400, f"job {job_id} has already {record.state.value}", code="job_not_cancellable", param="job_id"
        )
    # A running trainer or evaluator sees the state within seconds and stops without publishing; a task
    # still waiting in a queue is withdrawn from it.
    return job_object(cancel(ctx.jobs, ctx.redis, job_id, "Job cancelled by the user"))


@router.post(
    "/{job_id}/pause",
    summary="Pause a queued or running fine-tuning job",
    response_model=FineTuningJob,
    description=(
        "A running trainer stops at its next optimizer step. The job's `stage` becomes `paused`; its "
        "`status` reads `queued`, because the openai SDK's types do not list `paused`."
    ),
)
def pause_job(job_id: str, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)) -> dict:
    record = _require_job(ctx, tenant, job_id)
    if record.state not in (JobState.QUEUED, JobState.RUNNING):
        raise APIError(
            400,
            f"only queued or running jobs can be paused; job {job_id} is {record.state.value}",
            code="job_not_pausable",
        )
    return job_object(ctx.jobs.transition(job_id, JobState.PAUSED, "Job paused by the user"))


@router.post(
    "/{job_id}/resume",
    summary="Resume a paused fine-tuning job (it is queued again)",
    response_model=FineTuningJob,
)
def resume_job(
    job_id: str, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> dict:
    record = _require_job(ctx, tenant, job_id)
    if record.state is not JobState.PAUSED:
        raise APIError(400, f"job {job_id} is not paused (it is {record.state.value})", code="job_not_paused")
    message = "Job resumed by the user; queued"
    resumed = requeue_as_new_attempt(ctx.jobs, ctx.redis, ctx.settings, record, message, fenced=False)
    return job_object(resumed)


@router.get(
    "/{job_id}/checkpoints", summary="List a job's checkpoints (newest first)", response_model=CheckpointList
)
def list_checkpoints(
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    ctx: Context = Depends(get_context),
    tenant: str = Depends(caller_tenant),
) -> dict:
    _require_job(ctx, tenant, job_id)
    checkpoints, has_more = ctx.jobs.list_checkpoints(job_id, after=after, limit=limit)
    return list_object(checkpoints, has_more)


@router.get(
    "/{job_id}/events",
    summary="List a job's events (newest first), or follow them live with stream=true",
    response_model=EventList,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "with stream=true: server-sent events"}
    },
    description=(
        "With `stream=true` the answer is a server-sent event stream: every event from the start (or after "
        "`after`, or the `Last-Event-ID` header), oldest first, then new ones as they happen; each SSE `id` is "
        "the event id and `data` the event object. It ends with an `event: end` once the job has finished."
    ),
)
async def list_events(
    request: Request,
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    stream: bool = False,
    ctx: Context = Depends(get_context),
    tenant: str = Depends(caller_tenant),
):
    await run_in_threadpool(_require_job, ctx, tenant, job_id)
    header = request.headers.get("last-event-id") if stream else None
    cursor, param = (header, "Last-Event-ID") if header else (after or None, "after")
    if cursor is not None and not _is_event_id(cursor):
        raise APIError(
            400, f"{param}: {cursor[:100]!r} is not an event id (ftevent-…, the `id` of an event of this job)",
            code="invalid_event_id", param=param,
        )  # fmt: skip
    if stream:
        return StreamingResponse(
            _event_stream(request, ctx, job_id, cursor),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    events, has_more = await run_in_threadpool(
        lambda: ctx.jobs.list_events(job_id, after=cursor, limit=limit)
    )
    return list_object(events, has_more)


STREAM_POLL_MS = 1000
EVENT_ID = re.compile(r"ftevent-([0-9]{1,20})-([0-9]{1,20})")


def _is_event_id(value: str) -> bool:
    """An id as the job store makes them: `ftevent-` and a Redis stream id, both halves 64-bit."""
    match = EVENT_ID.fullmatch(value)
    return match is not None and all(int(half) < 2**64 for half in match.groups())


async def _event_stream(request: Request, ctx: Context, job_id: str, cursor: str | None):
    while True:
        events = await run_in_threadpool(
            partial(ctx.jobs.events_after, job_id, cursor, block_ms=STREAM_POLL_MS)
        )
        for event in events:
            cursor = event["id"]
            yield f"id: {cursor}\ndata: {json.dumps(event)}\n\n"
        if events:
            continue
        if ctx.stopping.is_set():
            yield f"event: end\ndata: {json.dumps({'status': 'server_stopping'})}\n\n"
            return
        record = await run_in_threadpool(ctx.jobs.get, job_id)
        if record is None or is_terminal(record.state) or await request.is_disconnected():
            status = record.state.value if record else "deleted"
            yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
            return
        yield ": keep-alive\n\n"


@router.get(
    "/{job_id}/metrics",
    summary="A job's per-step training metrics, for plotting",
    description="Every optimizer step's loss, accuracy, learning rate, gradient norm and throughput "
    "(validation loss at epoch ends), oldest first; `max_points` evenly thins long series.",
)
def job_metrics(
    job_id: str,
    max_points: Annotated[int, Query(ge=2, le=100_000)] = 10_000,
    ctx: Context = Depends(get_context),
    tenant: str = Depends(caller_tenant),
) -> dict:
    _require_job(ctx, tenant, job_id)
    rows = ctx.jobs.step_metrics(job_id)
    if len(rows) > max_points:
        stride = len(rows) / max_points
        rows = [rows[int(i * stride)] for i in range(max_points - 1)] + [rows[-1]]
    return {"object": "fine_tuning.job.metrics", "job_id": job_id, "data": rows}


def _artifact_files(ctx: Context, record: JobRecord) -> list[tuple[str, str]]:
    prefix = storage_keys.artifacts_prefix(record.tenant, record.id)
    return [(key.removeprefix(prefix), key) for key in ctx.storage.list_keys(prefix)]


@router.get(
    "/{job_id}/artifacts",
    summary="List a job's artifacts",
    description="The adapter (PEFT, safetensors), tokenizer, merged model (when exported), model card "
    "(README.md) and evaluation report, with their sizes.",
)
def list_artifacts(
    job_id: str, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> dict:
    record = _require_job(ctx, tenant, job_id)
    files = [{"path": name, "bytes": ctx.storage.size(key)} for name, key in _artifact_files(ctx, record)]
    return {"object": "list", "job_id": job_id, "data": files}


@router.get(
    "/{job_id}/artifacts/archive",
    summary="Download a job's artifacts as one tar archive (streamed)",
    response_class=StreamingResponse,
    responses={200: {"description": "A tar archive", "content": {"application/x-tar": {}}}},
)
def download_artifacts(
    job_id: str, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> StreamingResponse:
    record = _require_job(ctx, tenant, job_id)
    files = _artifact_files(ctx, record)
    if not files:
        raise APIError(404, f"job {job_id} has no artifacts yet", code="no_artifacts")
    return StreamingResponse(
        tar_stream(ctx.storage, files),
        media_type="application/x-tar",
        headers={"content-disposition": f'attachment; filename="{job_id}.tar"'},
    )
