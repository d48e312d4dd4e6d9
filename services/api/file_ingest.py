"""Storing a dataset: validated (every format of shared.data_formats) and then streamed to storage."""

from __future__ import annotations

import time
import unicodedata
from pathlib import PurePath
from typing import Any, BinaryIO

from services.api.context import Context
from services.api.errors import APIError
from shared import storage_keys
from shared.data_formats import DataLimits, check_dataset
from shared.ids import new_file_id
from shared.records import FileRecord, now
from shared.splits import suggested_split

UPLOAD_PURPOSES = ("fine-tune",)
MAX_FILENAME_CHARS = 255
# Validation reads at least ~25 MB/s of ordinary data; a file that takes longer than this is built to be
# slow (pathological JSON), and holds a worker thread and its client for nothing.
VALIDATION_SECONDS = 120.0
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


def ingest(
    ctx: Context, tenant: str, source: BinaryIO, filename: str, purpose: str, format: str | None = None
) -> FileRecord:
    """Store `source` (a seekable local file) as a new file of `tenant`; bad files get status `error`.

    Two passes over the local copy: validation, then the upload. A file with problems is still stored,
    so its owner can fetch it and see what the report says, but no job accepts it.
    """
    limits = DataLimits(max_line_bytes=ctx.settings.max_line_bytes)
    source.seek(0)
    check = check_dataset(
        Budgeted(source, VALIDATION_SECONDS), filename=filename, format=format, limits=limits
    )
    source.seek(0)
    file_id = new_file_id()
    key = storage_keys.file_key(tenant, file_id)
    stored = ctx.storage.put_stream(key, source)
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
            "stats": check.stats,
            "personal_data": check.pii,
            # Used when a job names no validation file (shared/splits.py).
            "suggested_split": suggested_split(check.n_examples) if check.n_examples else None,
        },
    )
    ctx.files.save(record)
    return record


class Budgeted:
    """`source`, read within a time budget: validation reads it piece by piece, so a read past the deadline
    stops it with a 400 that says so, whatever the content makes the validator do."""

    def __init__(self, source: BinaryIO, seconds: float) -> None:
        self._source = source
        self._seconds = seconds
        self._deadline = time.monotonic() + seconds

    def _check(self) -> None:
        if time.monotonic() >= self._deadline:
            raise APIError(
                400, f"file: validating it took longer than {self._seconds:g} s; upload a smaller or simpler "
                "file (or split it)", code="validation_timeout", param="file",
            )  # fmt: skip

    def read(self, size: int = -1) -> bytes:
        self._check()
        return self._source.read(size)

    def read1(self, size: int = -1) -> bytes:
        self._check()
        return self._source.read1(size)  # type: ignore[attr-defined]

    def readinto(self, buffer: Any) -> int:
        self._check()
        return self._source.readinto(buffer)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)
