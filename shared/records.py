"""The records Tunery keeps for files and fine-tuning jobs (stored as JSON in Redis and storage)."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.job_states import JobState

DEFAULT_TENANT = "org-default"

FileStatus = Literal["uploaded", "processed", "error"]


def now() -> int:
    return int(time.time())


class FileRecord(BaseModel):
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    status: FileStatus
    status_details: str | None = None
    sha256: str
    storage_key: str
    format: str | None = None
    n_examples: int | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Hyperparameters(BaseModel):
    """Resolved values, each with the reason it was chosen (user-set or the rule that picked it)."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    reasons: dict[str, str] = Field(default_factory=dict)


class LoraSettings(BaseModel):
    r: int = Field(default=8, ge=1, le=256)
    alpha: int = Field(default=16, ge=1, le=1024)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None


class Progress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    train_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    updated_at: int | None = None


class JobRecord(BaseModel):
    id: str
    tenant: str
    created_at: int
    model: str
    training_file: str
    validation_file: str | None = None
    seed: int
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    method_type: str = "supervised"
    # What the client asked for, "auto" included, as the API echoes it back.
    requested_hyperparameters: dict[str, Any] = Field(default_factory=dict)
    hyperparameters: Hyperparameters
    lora: LoraSettings
    max_seq_length: int
    state: JobState = JobState.VALIDATING_FILES
    error: JobError | None = None
    fine_tuned_model: str | None = None
    started_at: int | None = None
    finished_at: int | None = None
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    result_files: list[str] = Field(default_factory=list)
    # Incremented each time the job is handed to a trainer; a stale attempt may not publish.
    attempt: int = 0
    progress: Progress = Field(default_factory=Progress)
    artifacts: dict[str, str] = Field(default_factory=dict)
    evaluation: dict[str, Any] | None = None


def fine_tuned_model_id(record: JobRecord) -> str:
    """OpenAI's shape: ft:<base>:<org>:<suffix>:<job id>."""
    return f"ft:{record.model}:{record.tenant}:{record.suffix or ''}:{record.id}"
