"""One artifact of a job, on its own: the model card, the evaluation report or a weights file, without
streaming the whole archive (a merged model can be gigabytes; the console's model card needs kilobytes)."""

from __future__ import annotations

import mimetypes
from pathlib import PurePosixPath
from urllib.parse import quote

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from services.api.auth import caller_tenant
from services.api.context import Context, get_context
from services.api.errors import APIError, not_found
from shared.platform import storage_keys

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

# Text artifacts a browser should show as text; everything else is bytes.
TEXT_TYPES = {
    ".md": "text/markdown; charset=utf-8",
    ".jsonl": "application/jsonl",
    ".json": "application/json",
}


@router.get(
    "/{job_id}/artifacts/files/{path:path}",
    summary="Download one of a job's artifacts",
    response_class=StreamingResponse,
    responses={
        200: {"description": "The artifact's bytes", "content": {"application/octet-stream": {}}},
        404: {"description": "No such job for the caller's organization, or no artifact at that path"},
    },
    description="`path` as GET /v1/fine_tuning/jobs/{job_id}/artifacts lists it, e.g. `README.md` (the model "
    "card), `evaluation.json` or `adapter/adapter_model.safetensors`.",
)
def download_artifact(
    job_id: str, path: str, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> StreamingResponse:
    record = ctx.jobs.get(job_id, tenant)
    if record is None:
        raise not_found("fine-tuning job", job_id)
    prefix = storage_keys.artifacts_prefix(record.tenant, record.id)
    key = prefix + path
    # Only a path the listing has: nothing outside the job's artifacts can be named, `..` or not.
    if key not in ctx.storage.list_keys(prefix):
        raise APIError(404, f"job {job_id} has no artifact {path!r}", code="artifact_not_found", param="path")
    name = PurePosixPath(path).name
    suffix = PurePosixPath(path).suffix
    media = TEXT_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    return StreamingResponse(
        ctx.storage.iter_chunks(key),
        media_type=media,
        headers={
            "content-disposition": f"attachment; filename*=UTF-8''{quote(name)}",
            "content-length": str(ctx.storage.size(key)),
        },
    )
