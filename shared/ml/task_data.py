"""A job's rows as its method trains on them, read the same way by data preparation, the trainer and the
evaluators: the Examples of the method's data kind (chat conversations, preference pairs, classification rows),
read by the kind's reader (shared.methods).

The held-out split the trainer sets aside when a job has no validation file is stored as JSONL in the
method's own format (`split_jsonl`), each row with the fields its format does not use (e.g. `group`), so
the evaluator reads it back with `read_rows` as it reads a validation file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from redis import Redis

from shared.data import pii
from shared.data.formats import Example
from shared.methods import load, method
from shared.ml.chat_data import Messages
from shared.platform import storage_keys
from shared.platform.failures import JobFailure
from shared.platform.file_store import FileStore
from shared.platform.records import JobRecord
from shared.platform.storage import Storage

SPLIT_FILENAME = "validation_split.jsonl"  # the name the stored split is read under (its container)


def read_rows(path: Path, filename: str, method_type: str, *, redact: bool = False) -> list[Example]:
    """The Examples of a dataset for `method_type`, read by its data kind's reader (each keeps its place in
    the file and the fields its format does not use, e.g. `group`).

    With `redact`, personal data and secrets in every text the model sees are replaced by
    `[REDACTED:<kind>]` (a job's `data_policy: redact`); labels and other fields are kept.
    """
    examples = load(method(method_type).data_kind.reader)(path, filename)
    return [redacted(example) for example in examples] if redact else examples


def redacted(example: Example) -> Example:
    """An example with its text and every message's content redacted (prompt and replies alike)."""

    def messages(items: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if items is None:
            return None
        return [
            {**m, "content": pii.redact(m["content"])} if isinstance(m.get("content"), str) else m
            for m in items
        ]

    text = pii.redact(example.text) if example.text is not None else None
    return replace(
        example,
        text=text,
        messages=messages(example.messages),
        chosen=messages(example.chosen),
        rejected=messages(example.rejected),
    )


def split_jsonl(rows: Sequence[Messages | Example]) -> bytes:
    """Held-out rows as JSONL that `read_rows` reads back as the same rows (fields included)."""
    lines = []
    for row in rows:
        record = {"messages": row} if isinstance(row, list) else {**row.fields, **row.to_record()}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines).encode()


def read_validation_rows(
    redis: Redis, storage: Storage, record: JobRecord, workdir: Path
) -> tuple[list[Any], str]:
    """The job's held-out rows and where they come from: its validation file (redacted as the trainer
    redacted it) or the split the trainer stored (already redacted)."""
    path = workdir / SPLIT_FILENAME
    if record.validation_file:
        file = FileStore(redis).get(record.validation_file, record.tenant)
        if file is None:
            raise JobFailure(
                "file_not_found", f"validation file {record.validation_file} was deleted", "validation_file"
            )
        storage.download_file(file.storage_key, path)
        rows = read_rows(path, file.filename, record.method_type, redact=record.data_policy == "redact")
        return rows, "validation_file"
    storage.download_file(storage_keys.validation_split_key(record.tenant, record.id), path)
    return read_rows(path, SPLIT_FILENAME, record.method_type), "held_out_split"
