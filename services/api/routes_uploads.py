"""/v1/uploads: OpenAI's Uploads API for large files, sent in parts and assembled into one file.

Parts go to storage as they arrive (each at most TUNERY_MAX_UPLOAD_PART_BYTES); completing the
upload streams them, in the order the client gives, into a single file that is validated as a direct
upload is: before the answer up to TUNERY_SYNC_VALIDATION_BYTES, after it (the file `uploaded` until
then) beyond. The openai SDK's `client.uploads.upload_file_chunked` drives this.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, UploadFile
from pydantic import BaseModel, Field
from redis import WatchError

from services.api.auth import caller_tenant
from services.api.context import Context, get_context
from services.api.errors import APIError, not_found
from services.api.file_ingest import UPLOAD_PURPOSES, IncomingFile, ingest, safe_filename
from services.api.schemas import Upload, UploadPart, file_object
from shared.platform.ids import new_id
from shared.platform.records import now

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])

UPLOAD_TTL_SECONDS = 3600
# How long a completion may hold its claim: far beyond the validation's time budget, short enough that an
# upload whose completing process died can be completed again (or cancelled) well before it expires.
COMPLETION_CLAIM_SECONDS = 15 * 60


class UploadPartRecord(BaseModel):
    id: str
    created_at: int
    bytes: int
    storage_key: str


class UploadRecord(BaseModel):
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    mime_type: str
    created_at: int
    expires_at: int
    status: Literal["pending", "completed", "cancelled", "expired"] = "pending"
    parts: list[UploadPartRecord] = Field(default_factory=list)
    file_id: str | None = None


class UploadCreate(BaseModel):
    filename: str = Field(
        min_length=1,
        description="Stored as its base name, without control characters, at most 255 characters",
    )
    purpose: str
    bytes: int = Field(ge=1)
    mime_type: str
    expires_after: dict | None = None


class UploadComplete(BaseModel):
    part_ids: list[str] = Field(min_length=1)
    md5: str | None = None


def _key(upload_id: str) -> str:
    return f"tunery:upload:{upload_id}"


def _claim_key(upload_id: str) -> str:
    """Held (SET NX) by the one request completing or cancelling an upload, so that its parts become exactly
    one file, and are not deleted while they are read; its value names what that request does."""
    return f"tunery:upload:{upload_id}:claim"


def _save(ctx: Context, record: UploadRecord) -> None:
    # Kept a day past expiry so late clients get a clear "expired" rather than "not found".
    ctx.redis.set(_key(record.id), record.model_dump_json(), ex=UPLOAD_TTL_SECONDS + 24 * 3600)


def _require(ctx: Context, tenant: str, upload_id: str) -> UploadRecord:
    raw = ctx.redis.get(_key(upload_id))
    record = UploadRecord.model_validate_json(raw) if raw is not None else None
    if record is None or record.tenant != tenant:
        raise not_found("upload", upload_id)
    if record.status == "pending" and now() > record.expires_at:
        record.status = "expired"
        _save(ctx, record)
    return record


def _require_pending(ctx: Context, tenant: str, upload_id: str) -> UploadRecord:
    record = _require(ctx, tenant, upload_id)
    if record.status != "pending":
        raise APIError(
            400,
            f"upload {upload_id} is already {record.status}",
            code="upload_not_pending",
            param="upload_id",
        )
    claim = ctx.redis.get(_claim_key(upload_id))
    if claim is not None:
        raise _claimed_by_another(upload_id, claim.decode())
    return record


def _claimed_by_another(upload_id: str, action: str) -> APIError:
    return APIError(
        400,
        f"upload {upload_id} is being {action} by another request; retrieve it once that has finished",
        code="upload_in_progress",
        param="upload_id",
    )


@contextmanager
def _claim(ctx: Context, tenant: str, upload_id: str, action: str) -> Iterator[UploadRecord]:
    """The pending upload, held by this request alone until the block ends: others get a 400 that says why."""
    _require_pending(ctx, tenant, upload_id)
    if not ctx.redis.set(_claim_key(upload_id), action, nx=True, ex=COMPLETION_CLAIM_SECONDS):
        raise _claimed_by_another(upload_id, (ctx.redis.get(_claim_key(upload_id)) or b"completed").decode())
    try:
        # Read again under the claim: another request may have finished with it since the check above.
        record = _require(ctx, tenant, upload_id)
        if record.status != "pending":
            raise APIError(
                400, f"upload {upload_id} is already {record.status}", code="upload_not_pending",
                param="upload_id",
            )  # fmt: skip
        yield record
    finally:
        ctx.redis.delete(_claim_key(upload_id))


def _part_key(record: UploadRecord, part_id: str) -> str:
    return f"tenants/{record.tenant}/uploads/{record.id}/{part_id}"


def upload_object(ctx: Context, record: UploadRecord) -> dict:
    file = ctx.files.get(record.file_id, record.tenant) if record.file_id else None
    return {
        "id": record.id,
        "object": "upload",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": record.status,
        "file": file_object(file) if file else None,
    }


@router.post("", summary="Create an upload", response_model=Upload)
def create_upload(
    body: UploadCreate, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> dict:
    if body.purpose not in UPLOAD_PURPOSES:
        raise APIError(400, f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}", param="purpose")
    if body.bytes > ctx.settings.max_upload_bytes:
        raise APIError(
            413,
            f"bytes exceeds the limit of {ctx.settings.max_upload_bytes} (TUNERY_MAX_UPLOAD_BYTES)",
            param="bytes",
        )
    created = now()
    record = UploadRecord(
        id=new_id("upload"),
        tenant=tenant,
        filename=safe_filename(body.filename),
        purpose=body.purpose,
        bytes=body.bytes,
        mime_type=body.mime_type,
        created_at=created,
        expires_at=created + UPLOAD_TTL_SECONDS,
    )
    _save(ctx, record)
    return upload_object(ctx, record)


@router.post("/{upload_id}/parts", summary="Add a part to an upload", response_model=UploadPart)
def add_part(
    upload_id: str,
    data: Annotated[UploadFile, File(description="The bytes of this part.")],
    ctx: Context = Depends(get_context),
    tenant: str = Depends(caller_tenant),
) -> dict:
    record = _require_pending(ctx, tenant, upload_id)
    if not data.size:
        raise APIError(400, "data: a part must hold at least one byte", code="empty_part", param="data")
    if data.size > ctx.settings.max_upload_part_bytes:
        raise APIError(
            413, f"a part may hold at most {ctx.settings.max_upload_part_bytes} bytes", param="data"
        )
    part_id = new_id("part")
    data.file.seek(0)
    stored = ctx.storage.put_stream(_part_key(record, part_id), data.file)
    part = UploadPartRecord(id=part_id, created_at=now(), bytes=stored.size, storage_key=stored.key)
    # Re-read before appending so parts sent concurrently are all kept.
    with ctx.redis.pipeline() as pipe:
        while True:
            try:
                pipe.watch(_key(upload_id), _claim_key(upload_id))
                current = UploadRecord.model_validate_json(pipe.get(_key(upload_id)))
                claim = pipe.get(_claim_key(upload_id))
                state = f"being {claim.decode()}" if claim is not None else current.status
                if state != "pending":
                    # Completed or cancelled while this part was stored: nothing will ever read it.
                    ctx.storage.delete(stored.key)
                    raise APIError(
                        400, f"upload {upload_id} was {state} before this part was stored",
                        code="upload_not_pending", param="upload_id",
                    )  # fmt: skip
                current.parts.append(part)
                pipe.multi()
                pipe.set(_key(upload_id), current.model_dump_json(), keepttl=True)
                pipe.execute()
                break
            except WatchError:
                continue
    return {"id": part_id, "object": "upload.part", "created_at": part.created_at, "upload_id": upload_id}


def _complete(ctx: Context, record: UploadRecord, part_ids: list[str]) -> UploadRecord:
    parts = {p.id: p for p in record.parts}
    unknown = [p for p in part_ids if p not in parts]
    if unknown:
        raise APIError(400, f"unknown part ids: {', '.join(unknown)}", param="part_ids")
    if len(set(part_ids)) != len(part_ids):
        raise APIError(400, "part_ids lists a part more than once", param="part_ids")
    total = sum(parts[p].bytes for p in part_ids)
    if total != record.bytes:
        raise APIError(
            400,
            f"the parts hold {total} bytes but the upload was created for {record.bytes}",
            param="part_ids",
        )

    # The parts, in the client's order, into one file: stored as they are read, with a local copy that a
    # validation process reads.
    incoming = IncomingFile(ctx, record.tenant)
    try:
        for part_id in part_ids:
            for chunk in ctx.storage.iter_chunks(parts[part_id].storage_key):
                incoming.write(chunk)
    except BaseException:
        incoming.discard()
        raise
    file = ingest(ctx, incoming, record.filename, record.purpose)
    for part in record.parts:
        ctx.storage.delete(part.storage_key)
    record.status = "completed"
    record.file_id = file.id
    _save(ctx, record)
    return record


@router.post(
    "/{upload_id}/complete", summary="Complete an upload: its parts become one file", response_model=Upload
)
def complete_upload(
    upload_id: str,
    body: UploadComplete,
    ctx: Context = Depends(get_context),
    tenant: str = Depends(caller_tenant),
) -> dict:
    with _claim(ctx, tenant, upload_id, "completed") as record:
        completed = _complete(ctx, record, body.part_ids)
    return upload_object(ctx, completed)


@router.post("/{upload_id}/cancel", summary="Cancel an upload and drop its parts", response_model=Upload)
def cancel_upload(
    upload_id: str, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> dict:
    with _claim(ctx, tenant, upload_id, "cancelled") as record:
        for part in record.parts:
            ctx.storage.delete(part.storage_key)
        record.status = "cancelled"
        _save(ctx, record)
    return upload_object(ctx, record)
