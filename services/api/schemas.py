"""Request bodies and the OpenAI-shaped objects the API returns.

Objects carry every key the openai SDK's types name (null where empty); Tunery's extras are
additional keys, which the SDK keeps.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from shared.methods import DEFAULT_METHOD, METHODS, NAMES, CommonHyperparameters, method
from shared.platform.job_states import public_status
from shared.platform.records import Distributed, FileRecord, JobRecord, LearningRateSweep, LoraSettings

Auto = Literal["auto"]


class _MethodSelection(BaseModel):
    """OpenAI's `method`: its type, and the hyperparameters under the key the type names."""

    model_config = ConfigDict(extra="forbid")

    def hyperparameters(self) -> CommonHyperparameters | None:
        """The hyperparameters given under the key `type` names."""
        section = getattr(self, self.type)
        return section.hyperparameters if section is not None else None


def _method_in() -> type[_MethodSelection]:
    """`method` as the registry's methods make it: `type` one of their names, and for each method a key
    holding its own hyperparameters model (SupervisedIn, DpoIn, ClassificationIn, ...)."""
    summaries = [m.summary for m in METHODS.values()]
    sections: dict[str, Any] = {}
    for m in METHODS.values():
        section = create_model(
            f"{m.name.title()}In",
            __config__=ConfigDict(extra="forbid"),
            hyperparameters=(m.hyperparameters | None, None),
        )
        sections[m.name] = (section | None, Field(default=None, description=m.api_note))
    return create_model(
        "MethodIn",
        __base__=_MethodSelection,
        type=(Literal[NAMES], Field(description=", ".join(summaries[:-1]) + ", or " + summaries[-1])),
        **sections,
    )


MethodIn = _method_in()
# OpenAI's deprecated top-level `hyperparameters` are those of the default method (supervised).
HyperparametersIn = METHODS[DEFAULT_METHOD].hyperparameters


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A model id from GET /v1/models (the operator's catalog).")
    training_file: str
    validation_file: str | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    suffix: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    metadata: dict[str, str] | None = None
    hyperparameters: HyperparametersIn | None = Field(
        default=None, description="Deprecated by OpenAI in favour of method; accepted."
    )
    method: MethodIn | None = None
    integrations: list[dict[str, Any]] | None = None
    gpu_class: str | None = Field(
        default=None,
        description="Tunery extra: the GPU class to train on (default: the server's TUNERY_GPU_CLASS)",
    )
    max_cost_usd: float | None = Field(
        default=None, gt=0, description="Tunery extra: stop training when the job has cost this much"
    )
    max_duration_seconds: int | None = Field(
        default=None, gt=0, description="Tunery extra: stop training after this many seconds of training"
    )
    data_policy: Literal["warn", "redact", "reject"] = Field(
        default="warn",
        description="Tunery extra: personal data found in the files is reported (warn), replaced by "
        "[REDACTED:<kind>] before training (redact), or fails the job before training (reject)",
    )
    export_merged: bool = Field(
        default=False,
        description="Tunery extra: also export the base model with the adapter merged in (safetensors, "
        "loadable by transformers and vLLM without peft)",
    )
    learning_rate_sweep: LearningRateSweep | None = Field(
        default=None,
        description="Tunery extra: try these learning-rate multipliers on a fraction of the steps each, then "
        "train the job with the one of lowest validation loss",
    )
    lora: LoraSettings | None = Field(
        default=None,
        description="Tunery extra (send via extra_body): LoRA r, alpha, dropout, target modules.",
    )
    num_gpus: int = Field(
        default=1, ge=1, le=64,
        description="Tunery extra: devices per node, one training process each (at most the GPU class's "
        "devices_per_node)",
    )  # fmt: skip
    num_nodes: int = Field(default=1, ge=1, le=64, description="Tunery extra: nodes the job trains on")
    distributed: Distributed = Field(
        default="ddp",
        description="Tunery extra: how several devices share the work: ddp (a replica per device), fsdp "
        "(weights sharded), deepspeed_zero2 or deepspeed_zero3",
    )
    checkpoint_every_steps: int | None = Field(
        default=None, ge=1,
        description="Tunery extra: save a full training state every this many steps (default: the "
        "server's TUNERY_CHECKPOINT_EVERY_STEPS)",
    )  # fmt: skip
    hub_repo: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=96,
        description="Tunery extra: when the job succeeds, publish its artifacts to this Hugging Face Hub "
        "repository (owner/name; private, created if missing; needs the server's TUNERY_HF_TOKEN)",
    )  # fmt: skip
    checkpoint_every_seconds: float | None = Field(
        default=None, gt=0,
        description="Tunery extra: save a full training state every this many seconds (default: the "
        "server's TUNERY_CHECKPOINT_EVERY_SECONDS)",
    )  # fmt: skip

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError("at most 16 key-value pairs")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("keys are at most 64 characters and values at most 512")
        return value

    @property
    def method_type(self) -> str:
        return self.method.type if self.method else DEFAULT_METHOD

    def requested_hyperparameters(self) -> dict[str, Any]:
        given = self.method.hyperparameters() if self.method else None
        if given is None:
            given = self.hyperparameters  # OpenAI's deprecated top-level form (supervised jobs)
        return given.requested() if given else {}


def file_object(record: FileRecord) -> dict[str, Any]:
    report = dict(record.report or {})
    # Files stored before problems were kept as rows have only status_details.
    problems = report.pop("problems", None)
    total_problems = report.pop("total_problems", None)
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": record.status,
        "status_details": record.status_details,
        "expires_at": None,
        # Tunery extras
        "container": record.container,
        "format": record.format,
        "task": record.task,
        "n_examples": record.n_examples,
        "report": report if record.report is not None else None,
        "problems": problems,
        "total_problems": total_problems,
        "sha256": record.sha256,
    }


def job_object(record: JobRecord) -> dict[str, Any]:
    hp = record.hyperparameters
    requested = record.requested_hyperparameters
    hyperparameters = {
        name: getattr(hp, name) if hp is not None else requested.get(name, "auto")
        for name in ("batch_size", "learning_rate_multiplier", "n_epochs")
    }
    return {
        "id": record.id,
        "object": "fine_tuning.job",
        "created_at": record.created_at,
        "model": record.model,
        "organization_id": record.tenant,
        "training_file": record.training_file,
        "validation_file": record.validation_file,
        "hyperparameters": hyperparameters,
        "method": method_object(record, hyperparameters),
        "status": public_status(record.state),
        "error": record.error.model_dump() if record.error else None,
        "fine_tuned_model": record.fine_tuned_model,
        "finished_at": record.finished_at,
        "trained_tokens": record.trained_tokens,
        "estimated_finish": record.estimated_finish,
        "result_files": record.result_files,
        "seed": record.seed,
        "suffix": record.suffix,
        "metadata": record.metadata,
        "integrations": [],
        "user_provided_suffix": record.suffix,
        # Tunery extras
        "stage": record.state.value,
        "started_at": record.started_at,
        "resolved_hyperparameters": hp.model_dump(exclude={"reasons"}) if hp is not None else None,
        "hyperparameter_reasons": hp.reasons if hp is not None else {},
        "requested_hyperparameters": requested,
        "lora": record.lora.model_dump(),
        "gpu_class": record.gpu_class,
        "budget": record.budget.model_dump(),
        "usage": record.usage.model_dump(),
        "estimate": record.estimate,
        "learning_rate_sweep": record.learning_rate_sweep.model_dump()
        if record.learning_rate_sweep
        else None,
        "sweep_results": record.sweep_results,
        "progress": record.progress.model_dump(),
        "evaluation": record.evaluation,
        "attempt": record.attempt,
        "num_gpus": record.num_gpus,
        "num_nodes": record.num_nodes,
        "distributed": record.distributed,
        "checkpoint_every_steps": record.checkpoint_every_steps,
        "checkpoint_every_seconds": record.checkpoint_every_seconds,
        "resume_checkpoint": record.resume_checkpoint.model_dump() if record.resume_checkpoint else None,
        "hub_repo": record.hub_repo,
        "data_policy": record.data_policy,
    }


def method_object(record: JobRecord, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `method`: the type and its hyperparameters under the key it names (OpenAI's other keys
    null); Tunery's own methods under their names. Resolved values once known, else the request's."""
    hp = record.hyperparameters
    requested = record.requested_hyperparameters
    trained = method(record.method_type)
    shown = {
        name: getattr(hp, name) if hp is not None else requested.get(name, "auto") for name in trained.shown
    }
    section: dict[str, Any] = dict.fromkeys(OPENAI_METHOD_KEYS)
    section[trained.name] = {"hyperparameters": hyperparameters | shown}
    return {"type": trained.name, **section}


# The keys of OpenAI's `method` object, which the openai SDK's types name.
OPENAI_METHOD_KEYS = ("supervised", "dpo", "reinforcement")


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


# -- response shapes, for the OpenAPI description (extra keys are Tunery's additions) --------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class FileProblem(BaseModel):
    place: Literal["line", "item", "row"] | None = Field(
        description="What `line` counts: a JSONL line, a JSON array's item, a CSV or Parquet row; null for "
        "the whole file"
    )
    line: int | None
    field: str | None = Field(description="The field it is about (`messages[2].role`), when it names one")
    reason: str


class FileObject(_Open):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None
    expires_at: int | None
    format: str | None = Field(description="Tunery: the detected data format")
    n_examples: int | None = Field(description="Tunery: valid examples in the file")
    sha256: str = Field(description="Tunery: SHA-256 of the bytes")
    problems: list[FileProblem] | None = Field(
        default=None,
        description="Tunery: the first 20 problems validation found (none for a processed file); null for "
        "files stored before problems were listed",
    )
    total_problems: int | None = Field(default=None, description="Tunery: every problem found, shown or not")


class FilePreview(_Open):
    object: Literal["list"]
    file_id: str
    format: str | None
    data: list[dict[str, Any]] = Field(
        description="The first examples as Tunery reads them: {source (line, item or row N), kind (chat, "
        "text, preference or classification), messages, chosen, rejected, text, label, tools, fields}"
    )


class Deleted(_Open):
    id: str
    object: str
    deleted: bool


class JobError(_Open):
    code: str
    message: str
    param: str | None


class JobHyperparameters(_Open):
    batch_size: int | Auto | None
    learning_rate_multiplier: float | Auto | None
    n_epochs: int | Auto | None


class FineTuningJob(_Open):
    id: str
    object: Literal["fine_tuning.job"]
    created_at: int
    model: str
    organization_id: str
    training_file: str
    validation_file: str | None
    hyperparameters: JobHyperparameters
    method: dict[str, Any]
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    trained_tokens: int | None
    estimated_finish: int | None
    result_files: list[str]
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None
    integrations: list[dict[str, Any]] | None
    stage: str = Field(description="Tunery: the exact state, including evaluating and paused")
    progress: dict[str, Any] = Field(
        description="Tunery: step, total_steps, epoch, loss, learning rate, tokens/s"
    )
    lora: dict[str, Any] = Field(description="Tunery: LoRA r, alpha, dropout, target modules")
    evaluation: dict[str, Any] | None = Field(
        description="Tunery: base vs fine-tuned metrics on held-out rows"
    )


class JobEvent(_Open):
    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] | None
    data: dict[str, Any] | None


class Checkpoint(_Open):
    id: str
    object: Literal["fine_tuning.job.checkpoint"]
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, float | None]


class Model(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class Upload(_Open):
    id: str
    object: Literal["upload"]
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: Literal["pending", "completed", "cancelled", "expired"]
    file: FileObject | None


class UploadPart(_Open):
    id: str
    object: Literal["upload.part"]
    created_at: int
    upload_id: str


class _Page(_Open):
    object: Literal["list"]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileList(_Page):
    data: list[FileObject]


class JobList(_Page):
    data: list[FineTuningJob]


class EventList(_Page):
    data: list[JobEvent]


class CheckpointList(_Page):
    data: list[Checkpoint]


class ModelList(_Page):
    data: list[Model]


# -- inference: trying a model before exporting it (POST /v1/chat/completions, /v1/classifications) ------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        """The message as chat templates take it (OpenAI's `developer` is the templates' `system`)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A fine-tuned model of your organization (`ft:…`) or a catalog model id.")
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(
        default=None, ge=1, description="At most TUNERY_INFERENCE_MAX_TOKENS (also the default)."
    )
    max_completion_tokens: int | None = Field(default=None, ge=1, description="The newer name of max_tokens.")
    temperature: float | None = Field(default=1.0, ge=0, le=2, description="0 decodes greedily.")
    top_p: float | None = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(default=None, description="Up to 4 strings the reply ends before.")
    n: int | None = Field(default=1, ge=1, le=1, description="Only 1 choice is generated.")
    stream: bool | None = Field(default=False, description="Streaming is not available; must be false.")
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty strings")
        return stops


class ChatCompletionMessage(_Open):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None


class ChatCompletionChoice(_Open):
    index: int
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class CompletionUsage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


class ClassificationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A classifier fine-tuned by your organization (method classification).")
    input: str | list[str] = Field(
        description="A text or a list of texts (at most TUNERY_INFERENCE_MAX_INPUTS)."
    )

    @field_validator("input")
    @classmethod
    def _input(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("needs at least one text")
        empty = next((i for i, text in enumerate(texts) if not text.strip()), None)
        if empty is not None:
            raise ValueError(f"text {empty} is empty")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ClassificationResult(_Open):
    index: int
    label: str = Field(description="The most probable label (one of the training data's labels).")
    score: float = Field(description="Its probability.")
    scores: dict[str, float] = Field(description="Every label's probability.")


class ClassificationUsage(_Open):
    prompt_tokens: int
    total_tokens: int


class ClassificationList(_Open):
    object: Literal["list"]
    model: str
    data: list[ClassificationResult]
    usage: ClassificationUsage


# -- standalone evaluations -------------------------------------------------------------------------


class EvaluationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A catalog chat model, or a fine-tuned model of your organization (ft:…)")
    validation_file: str = Field(description="A processed file of the data the model's task reads")
    group_field: str | None = Field(
        default="group",
        description="Rows carrying this field are also scored per group, with the largest gap",
    )
    generation_rows: int = Field(default=64, ge=0, le=512, description="Prompts the models answer (0: none)")
    metadata: dict[str, str] | None = None


class Evaluation(_Open):
    id: str
    object: Literal["evaluation"]
    created_at: int
    model: str
    validation_file: str
    fine_tuning_job: str | None
    status: Literal["queued", "running", "succeeded", "failed"]
    report: dict[str, Any] | None = Field(
        description="base (and fine_tuned) metrics, verdict, per-group figures: as a job's evaluation"
    )
    error: dict[str, Any] | None
    finished_at: int | None


class EvaluationList(_Page):
    data: list[Evaluation]
