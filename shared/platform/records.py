"""The records Tunery keeps for files and fine-tuning jobs (stored as JSON in Redis and storage)."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.platform.job_states import JobState

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
    container: str | None = None  # jsonl, json, csv, parquet (.gz variants)
    # chat, prompt_completion, text, alpaca, sharegpt, preference, classification; while `uploaded`, the
    # format the upload asked for (None: detect it), which validation then reads it as.
    format: str | None = None
    task: str | None = None  # what it can train: chat, text, preference or classification
    n_examples: int | None = None
    # Statistics (duplicates, empty turns, lengths, labels) and personal data found, from validation.
    report: dict[str, Any] | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Hyperparameters(BaseModel):
    """Resolved values, each with the reason it was chosen (user-set or the rule that picked it).

    A method's own settings beyond the fields below are kept too (extra keys), so that a new method's rules
    (shared.methods) need no new field here."""

    model_config = ConfigDict(extra="allow")

    method: str = "lora"  # lora, or full (classification: every weight trains)
    n_epochs: int
    batch_size: (
        int  # examples per optimizer step = micro_batch_size × gradient_accumulation_steps × processes
    )
    micro_batch_size: int  # per process
    gradient_accumulation_steps: int = 1
    processes: int = 1  # training processes (one per device) the batch is shared by
    learning_rate_multiplier: float
    learning_rate: float
    max_seq_length: int
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    scheduler: str = "linear"
    max_grad_norm: float = 1.0
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0
    label_smoothing: float = 0.0
    # With packing, a micro-batch is `micro_batch_size` rows of max_seq_length tokens, each holding
    # several examples that cannot attend to each other (shared/ml/packing.py).
    packing: bool = False
    train_on_inputs: bool = False
    # Method dpo: how far the policy may move from the reference (larger keeps it closer).
    beta: float | None = None
    # Method classification: "balanced" weighs each class's loss by its rarity, "none" counts every example alike.
    class_weights: Literal["none", "balanced"] | None = None
    reasons: dict[str, str] = Field(default_factory=dict)


class Budget(BaseModel):
    max_cost_usd: float | None = Field(default=None, gt=0)
    max_duration_seconds: int | None = Field(default=None, gt=0)


class LearningRateSweep(BaseModel):
    """Short trials of several learning-rate multipliers; the best by validation loss trains the job."""

    multipliers: list[float] = Field(min_length=2, max_length=8)
    trial_fraction: float = Field(default=0.2, gt=0, le=0.5, description="share of the job's steps per trial")


class Usage(BaseModel):
    """What a job has consumed so far: every device it held counts."""

    device_seconds: float = 0.0
    cost_usd: float = 0.0


class LoraSettings(BaseModel):
    r: int = Field(default=8, ge=1, le=256)
    alpha: int = Field(default=16, ge=1, le=1024)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None


Distributed = Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]


class ResumeCheckpoint(BaseModel):
    id: str
    step: int
    attempt: int  # the attempt that saved it
    prefix: str  # where its files are stored
    trained_tokens: int = 0
    created_at: int


class Progress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    train_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    updated_at: int | None = None
    trained_tokens: int = 0


class JobRecord(BaseModel):
    id: str
    tenant: str
    created_at: int
    model: str
    training_file: str
    validation_file: str | None = None
    seed: int
    # The held-out split's (shared.data.splits.holdout_seed); None on records made before it: `seed`.
    holdout_seed: int | None = None
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    method_type: str = "supervised"  # a registered method's name (shared.methods; the API checks it)
    # What the client asked for, "auto" included, as the API echoes it back.
    requested_hyperparameters: dict[str, Any] = Field(default_factory=dict)
    # Resolved when the job's files are validated (None until then, shown as the request).
    hyperparameters: Hyperparameters | None = None
    lora: LoraSettings
    gpu_class: str = "cpu"
    budget: Budget = Field(default_factory=Budget)
    usage: Usage = Field(default_factory=Usage)
    estimate: dict[str, Any] | None = None
    # What to do with personal data found in the files: warn (an event), redact (the trainer sees
    # `[REDACTED:<kind>]`), or reject (the job fails before training).
    data_policy: Literal["warn", "redact", "reject"] = "warn"
    # Also publish the base model with the adapter merged in (a full-size copy of the weights).
    export_merged: bool = False
    learning_rate_sweep: LearningRateSweep | None = None
    sweep_results: list[dict[str, Any]] = Field(default_factory=list)
    # Devices: processes per node (one per GPU) and nodes, and how the model is spread over them.
    num_gpus: int = 1
    num_nodes: int = 1
    distributed: Distributed = "ddp"
    # Publish the artifacts to this Hugging Face Hub repository ("owner/name") when the job succeeds.
    hub_repo: str | None = None
    # Full-state checkpoints (None: the operator's TUNERY_CHECKPOINT_EVERY_* defaults).
    checkpoint_every_steps: int | None = None
    checkpoint_every_seconds: float | None = None
    # The newest full-state checkpoint of this job, from which its next attempt carries on.
    resume_checkpoint: ResumeCheckpoint | None = None
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
    # Deaths of the job's own training or evaluation process (TUNERY_MAX_ATTEMPTS), and retries after
    # faults of the platform (TUNERY_MAX_INFRASTRUCTURE_RETRIES): shared.platform.recovery.
    failed_attempts: int = 0
    infrastructure_retries: int = 0
    progress: Progress = Field(default_factory=Progress)
    artifacts: dict[str, str] = Field(default_factory=dict)
    evaluation: dict[str, Any] | None = None

    @property
    def split_seed(self) -> int:
        """The seed of the held-out split when the job has no validation file."""
        return self.seed if self.holdout_seed is None else self.holdout_seed


def fine_tuned_model_id(record: JobRecord) -> str:
    """OpenAI's shape: ft:<base>:<org>:<suffix>:<job id>."""
    return f"ft:{record.model}:{record.tenant}:{record.suffix or ''}:{record.id}"


EvaluationStatus = Literal["queued", "running", "succeeded", "failed"]


class EvaluationRecord(BaseModel):
    """A standalone evaluation (POST /v1/evaluations): one model on one validation file."""

    id: str
    tenant: str
    created_at: int
    model: str  # a catalog model or a fine-tuned model of the tenant
    validation_file: str
    fine_tuning_job: str | None = None  # the job that made `model`, when it is a fine-tuned model
    group_field: str | None = "group"  # rows carrying this field are also reported per group
    generation_rows: int = 64  # prompts the models answer (chat models)
    metadata: dict[str, str] | None = None
    status: EvaluationStatus = "queued"
    report: dict[str, Any] | None = None
    error: JobError | None = None
    finished_at: int | None = None
