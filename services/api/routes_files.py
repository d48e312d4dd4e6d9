"""/v1/files: upload (stored as it arrives, validated in a worker process), list, retrieve, preview, delete."""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from collections.abc import Iterator
from typing import Annotated, BinaryIO, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from services.api.archive import ChunkReader
from services.api.auth import caller_tenant
from services.api.context import Context, get_context
from services.api.errors import FILE_NOT_READY_RESPONSE, APIError, file_not_ready, not_found
from services.api.file_ingest import UPLOAD_PURPOSES, IncomingFile, ingest, safe_filename
from services.api.schemas import Deleted, FileList, FileObject, FilePreview, file_object, list_object
from services.api.upload_form import UploadForm, receive_form
from shared.data.formats import FORMATS, DataFormatError, DataLimits, read_examples
from shared.platform.queue import TOKEN_REPORT_TASK, run_estimate
from shared.platform.records import FileRecord

router = APIRouter(prefix="/v1/files", tags=["files"])


# The form, described by hand: the handler parses it itself as it arrives (services/api/upload_form.py).
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "contentMediaType": "application/octet-stream",
                            "description": 'The dataset, e.g. chat JSONL: one {"messages": [...]} per line.',
                        },
                        "purpose": {"type": "string", "description": "fine-tune"},
                        "format": {
                            "anyOf": [{"type": "string"}, {"type": "null"}],
                            "description": "Tunery extra: force a format instead of detecting it "
                            f"({', '.join(FORMATS)})",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    summary="Upload a file",
    response_model=FileObject,
    openapi_extra=UPLOAD_BODY,
    description="A file up to TUNERY_SYNC_VALIDATION_BYTES (8 MiB) is validated before the answer: status "
    "`processed` or `error`. A larger one is answered once stored, with status `uploaded`, and validated "
    "after: poll GET /v1/files/{file_id} (the openai SDK's `files.wait_for_processing`) until it is "
    "`processed` or `error`.",
)
async def create_file(
    request: Request, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> dict:
    form = await receive_form(request, ctx, tenant)
    try:
        file, purpose, format = _checked(form)
    except APIError:
        if form.file is not None:
            await run_in_threadpool(form.file.discard)
        raise
    record = await run_in_threadpool(ingest, ctx, file, safe_filename(form.filename), purpose, format)
    return file_object(record)


def _checked(form: UploadForm) -> tuple[IncomingFile, str, str | None]:
    """The form's file, purpose and format, or a 400 that names the field at fault."""
    if form.file is None:
        raise APIError(400, "file: Field required", code="invalid_request", param="file")
    purpose = form.fields.get("purpose")
    if purpose is None:
        raise APIError(400, "purpose: Field required", code="invalid_request", param="purpose")
    if purpose not in UPLOAD_PURPOSES:
        raise APIError(400, f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}", param="purpose")
    format = form.fields.get("format")
    if format is not None and format not in FORMATS:
        raise APIError(400, f"format must be one of {', '.join(FORMATS)}", param="format")
    return form.file, purpose, format


@router.get("", summary="List files", response_model=FileList)
def list_files(
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
    ctx: Context = Depends(get_context),
    tenant: str = Depends(caller_tenant),
) -> dict:
    records, has_more = ctx.files.list(tenant, after=after, limit=limit, order=order, purpose=purpose)
    return list_object([file_object(r) for r in records], has_more)


def _require_file(ctx: Context, tenant: str, file_id: str) -> FileRecord:
    record = ctx.files.get(file_id, tenant)
    if record is None:
        raise not_found("file", file_id)
    return record


@router.get("/{file_id}", summary="Retrieve a file", response_model=FileObject)
def retrieve_file(
    file_id: str, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> dict:
    return file_object(_require_file(ctx, tenant, file_id))


@router.get(
    "/{file_id}/content",
    summary="Download a file's content",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The bytes as uploaded (text/csv for .csv files)",
            "content": {"application/octet-stream": {}, "text/csv": {}},
        }
    },
)
def file_content(
    file_id: str, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> StreamingResponse:
    record = _require_file(ctx, tenant, file_id)
    chunks: Iterator[bytes] = ctx.storage.iter_chunks(record.storage_key)
    media = "text/csv" if record.filename.endswith(".csv") else "application/octet-stream"
    return StreamingResponse(chunks, media_type=media)


@router.delete("/{file_id}", summary="Delete a file", response_model=Deleted)
def delete_file(
    file_id: str, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> dict:
    record = _require_file(ctx, tenant, file_id)
    ctx.files.delete(record)
    ctx.storage.delete(record.storage_key)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get(
    "/{file_id}/preview",
    summary="The first examples of a file, as Tunery reads them",
    response_model=FilePreview,
    responses={
        400: {
            "description": "The file was not accepted (status `error`): it has problems, not examples; or it "
            "is still being validated (status `uploaded`, code `file_not_ready`): retry once it is `processed`"
        }
    },
    description="Whatever the container (JSONL, JSON, CSV, Parquet, gzip) and format (chat, prompt/completion, "
    "Alpaca, ShareGPT, preference pairs, text/label rows), each example in Tunery's internal form: the "
    "conversation, the preference pair, or the labelled text, and where in the file it is. Reads only as "
    "far as it needs (a Parquet file is fetched whole: its index is at its end).",
)
def file_preview(
    file_id: str,
    limit: Annotated[int, Query(ge=1, le=20)] = 3,
    ctx: Context = Depends(get_context),
    tenant: str = Depends(caller_tenant),
) -> dict:
    record = _require_file(ctx, tenant, file_id)
    if record.status == "uploaded":
        raise file_not_ready(file_id)
    if record.status != "processed":
        raise APIError(
            400, f"{file_id} was not accepted ({record.status_details}); it has no examples to preview",
            code="file_not_processed",
        )  # fmt: skip
    limits = DataLimits(max_line_bytes=ctx.settings.max_line_bytes)
    with tempfile.TemporaryFile() as local:
        if record.container == "parquet":
            for chunk in ctx.storage.iter_chunks(record.storage_key):
                local.write(chunk)
            local.seek(0)
            source: BinaryIO = local
        else:
            source = ChunkReader(ctx.storage.iter_chunks(record.storage_key))  # type: ignore[assignment]
        try:
            examples = list(
                itertools.islice(
                    read_examples(source, filename=record.filename, format=record.format, limits=limits),
                    limit,
                )
            )
        except DataFormatError as exc:  # the stored bytes no longer read as they did at upload
            raise APIError(400, f"{file_id}: {exc}", code="invalid_file") from None
    return {
        "object": "list",
        "file_id": file_id,
        "format": record.format,
        "data": [dataclasses.asdict(example) for example in examples],
    }


@router.get(
    "/{file_id}/report",
    summary="A file's dataset report",
    responses=FILE_NOT_READY_RESPONSE,
    description="The report made at upload (statistics, personal data, suggested split); with `model`, also "
    "the token counts of every row with that model's tokenizer and chat template (p50, p95, max, total) and "
    "how many rows `max_seq_length` (default: the model's) would truncate, computed by an evaluator worker.",
)
def file_report(
    file_id: str,
    model: str | None = None,
    max_seq_length: Annotated[int | None, Query(ge=16, le=1_048_576)] = None,
    ctx: Context = Depends(get_context),
    tenant: str = Depends(caller_tenant),
) -> dict:
    record = _require_file(ctx, tenant, file_id)
    if record.status == "uploaded":
        raise file_not_ready(file_id)
    report = {"object": "file.report", "file_id": file_id, "format": record.format, **(record.report or {})}
    if model is None:
        return report
    if model not in ctx.catalog:
        raise APIError(400, f"model {model!r} is not in the catalog", code="model_not_found", param="model")
    if record.task != "chat":
        raise APIError(400, f"token counts need chat data; {file_id} holds {record.format}", param="model")
    spec = {"tenant": tenant, "file_id": file_id, "model": model, "max_seq_length": max_seq_length}
    result = run_estimate(ctx.redis, spec, ctx.settings.estimate_timeout_seconds, TOKEN_REPORT_TASK)
    if result is None:
        raise APIError(503, "no evaluator worker answered in time; retry later", code="no_worker")
    if "error" in result:
        raise APIError(400, result["error"]["message"], code=result["error"]["code"])
    return report | result
