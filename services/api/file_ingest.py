"""Storing a dataset: validated (every format of shared.data.formats) and then streamed to storage."""

from __future__ import annotations

import unicodedata
from pathlib import Path, PurePath

from services.api.context import Context
from services.api.errors import APIError
from shared.data.formats import DataLimits
from shared.data.splits import suggested_split
from shared.data.validation_process import ValidationTimeout, check_file
from shared.platform import storage_keys
from shared.platform.ids import new_file_id
from shared.platform.records import FileRecord, now

UPLOAD_PURPOSES = ("fine-tune",)
MAX_FILENAME_CHARS = 255
# Validation's budget in CPU seconds: at least this, and one second per 2 MB. Ordinary data validates at
# about 8 MB per CPU second (short chat rows, the slowest per byte), so a file of the largest size allowed
# fits; one four times slower than that is built to be slow (pathological JSON) and would hold a
# validation process for nothing.
VALIDATION_SECONDS = 120.0
VALIDATION_BYTES_PER_SECOND = 2 * 1024 * 1024
DEFAULT_FILENAME = "upload.jsonl"


def safe_filename(name: str | None) -> str:
    """The name a file is stored and shown under: its base name only (no directories to traverse), without
    control or invisible format characters (no forged lines in logs or headers), at most 255 characters
    with the extension kept (it can choose the format)."""
    base = PurePath((name or "").replace("\\", "/")).name
    cleaned = "".join(c for c in base if unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp")).strip()
    if cleaned in ("", ".", ".."):
        return DEFAULT_FILENAME
    if len(cleaned) > MAX_FILENAME_CHARS:
        suffix = PurePath(cleaned).suffix[:16]
        cleaned = cleaned[: MAX_FILENAME_CHARS - len(suffix)] + suffix
    return cleaned


def validation_budget(size: int) -> float:
    """CPU seconds that validating a file of `size` bytes may take."""
    return max(VALIDATION_SECONDS, size / VALIDATION_BYTES_PER_SECOND)


def ingest(
    ctx: Context, tenant: str, path: Path, filename: str, purpose: str, format: str | None = None
) -> FileRecord:
    """Store the local file at `path` as a new file of `tenant`; bad files get status `error`.

    Two passes over the local copy: validation (in a worker process, shared.data.validation_process), then the
    upload. A file with problems is still stored, so its owner can fetch it and see what the report says,
    but no job accepts it.
    """
    limits = DataLimits(max_line_bytes=ctx.settings.max_line_bytes)
    seconds = validation_budget(path.stat().st_size)
    try:
        check = check_file(path, filename=filename, format=format, limits=limits, seconds=seconds)
    except ValidationTimeout:
        raise APIError(
            400, f"file: validating it took more than {seconds:g} s of CPU time; upload a simpler file "
            "(or split it)", code="validation_timeout", param="file",
        ) from None  # fmt: skip
    file_id = new_file_id()
    key = storage_keys.file_key(tenant, file_id)
    stored = ctx.storage.put_file(path, key)
    record = FileRecord(
        id=file_id,
        tenant=tenant,
        filename=filename,
        purpose=purpose,
        bytes=stored.size,
        created_at=now(),
        status="processed" if check.ok else "error",
        status_details=None if check.ok else check.summary(),
        sha256=stored.sha256,
        storage_key=key,
        container=check.container,
        format=check.format,
        task=check.task,
        n_examples=check.n_examples,
        report={
            # The first problems as rows (place, line, field, reason); GET /v1/files/{id} shows them.
            "problems": check.problem_list(),
            "total_problems": check.total_problems,
            "stats": check.stats,
            "personal_data": check.pii,
            # Used when a job names no validation file (shared/data/splits.py).
            "suggested_split": suggested_split(check.n_examples) if check.n_examples else None,
        },
    )
    ctx.files.save(record)
    return record
