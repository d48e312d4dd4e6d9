"""/v1/files: upload (validated in a worker process, then stored), list, retrieve, preview, delete."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, BinaryIO, Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from services.api.archive import ChunkReader
from services.api.auth import caller_tenant
from services.api.context import Context, get_context
from services.api.errors import APIError, not_found
from services.api.file_ingest import UPLOAD_PURPOSES, ingest, safe_filename
from services.api.schemas import Deleted, FileList, FileObject, FilePreview, file_object, list_object
from shared.data.formats import FORMATS, DataFormatError, DataLimits, read_examples
from shared.platform.queue import TOKEN_REPORT_TASK, run_estimate
from shared.platform.records import FileRecord

router = APIRouter(prefix="/v1/files", tags=["files"])

COPY_CHUNK_BYTES = 1024 * 1024


@router.post("", summary="Upload a file", response_model=FileObject)
async def create_file(
    file: Annotated[UploadFile, File(description='Chat JSONL: one {"messages": [...]} per line.')],
    purpose: Annotated[str, Form()],
    format: Annotated[
        str | None,
        Form(description=f"Tunery extra: force a format instead of detecting it ({', '.join(FORMATS)})"),
    ] = None,
    ctx: Context = Depends(get_context),
    tenant: str = Depends(caller_tenant),
) -> dict:
    if purpose not in UPLOAD_PURPOSES:
        raise APIError(400, f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}", param="purpose")
    if file.size is not None and file.size > ctx.settings.max_upload_bytes:
        raise APIError(
            413, f"the file is larger than the limit of {ctx.settings.max_upload_bytes} bytes", param="file"
        )
    if format is not None and format not in FORMATS:
        raise APIError(400, f"format must be one of {', '.join(FORMATS)}", param="format")
    name = safe_filename(file.filename)
    record = await run_in_threadpool(_ingest_form_file, ctx, tenant, file.file, name, purpose, format)
    return file_object(record)


def _ingest_form_file(
    ctx: Context, tenant: str, source: BinaryIO, name: str, purpose: str, format: str | None
) -> FileRecord:
    """Ingest the form's copy of the file; it has no name that a validation process could open, so it is
    copied to a file that has one."""
    with tempfile.NamedTemporaryFile() as local:
        source.seek(0)
        shutil.copyfileobj(source, local, COPY_CHUNK_BYTES)
        local.flush()
        return ingest(ctx, tenant, Path(local.name), name, purpose, format)


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
        400: {"description": "The file was not accepted (status `error`): it has problems, not examples"}
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
