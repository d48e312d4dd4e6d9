"""What a training method is, as the API, preparation and the workers look it up (docs/methods.md, "The
slices"): the light half of a method, torch-free, with its heavy parts (the recipe, the evaluator, the reader
and planner of its data kind) named by import path, as shared.platform.queue names tasks."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.data.formats.converters import DataKind
from shared.planning.estimate import Workload

Auto = Literal["auto"]
Rule = tuple[Any, str]  # a value and the reason it was chosen
# The request's value of a setting when it gives one, else the rule's; the reason is recorded either way.
Pick = Callable[[str, Rule], Any]


class CommonHyperparameters(BaseModel):
    """What the hyperparameters of every method share (each method's model adds its own)."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto | None = Field(default=None, description="1-50, or auto")
    batch_size: int | Auto | None = Field(default=None, description="1-256, or auto")
    learning_rate_multiplier: float | Auto | None = Field(
        default=None, description="> 0 (at most 10), or auto"
    )
    # Tunery extras (the SDK passes unknown nested keys through unchanged).
    max_seq_length: int | Auto | None = Field(default=None, description="Tunery: 16-131072 tokens, or auto")
    warmup_ratio: Annotated[float, Field(ge=0, le=0.5)] | Auto | None = Field(
        default=None, description="Tunery: share of steps, 0-0.5, or auto"
    )
    weight_decay: Annotated[float, Field(ge=0, le=1)] | Auto | None = Field(
        default=None, description="Tunery: AdamW weight decay, 0-1, or auto"
    )
    scheduler: Literal["linear", "cosine", "constant", "auto"] | None = Field(
        default=None, description="Tunery: learning-rate schedule after the warmup"
    )
    max_grad_norm: Annotated[float, Field(gt=0)] | Auto | None = Field(
        default=None, description="Tunery: gradient clipping norm, > 0, or auto"
    )
    early_stopping_patience: Annotated[int, Field(ge=1)] | Auto | None = Field(
        default=None,
        description="Tunery: epochs without a better validation loss before stopping (>= 1), or auto",
    )
    early_stopping_min_delta: Annotated[float, Field(ge=0)] | Auto | None = Field(
        default=None,
        description="Tunery: the decrease of the validation loss that counts as better (>= 0), or auto",
    )

    @field_validator("max_seq_length")
    @classmethod
    def _seq(cls, value: Any) -> Any:
        if isinstance(value, int) and not 16 <= value <= 131072:
            raise ValueError("must be between 16 and 131072")
        return value

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, value: Any) -> Any:
        if isinstance(value, int) and not 1 <= value <= 50:
            raise ValueError("must be between 1 and 50")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: Any) -> Any:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError("must be between 1 and 256")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lr(cls, value: Any) -> Any:
        if isinstance(value, float | int) and not 0 < value <= 10:
            raise ValueError("must be greater than 0 and at most 10")
        return value

    def requested(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


@dataclass(frozen=True)
class Planned:
    """What a method's own "auto" rules may read, once the shared rules have chosen."""

    train_lengths: list[int]  # token lengths of the training examples
    max_seq_length: int
    micro_batch_size: int
    seed: int


@dataclass(frozen=True)
class Rules:
    """Where a method's "auto" rules differ from the shared ones of shared.planning.hyperparams.resolve;
    every rule returns its value with the reason, as the shared ones do."""

    # The number of training examples → the batch size; None: the shared rule.
    batch_size: Callable[[int], Rule] | None = None
    # Every weight may train: the method's `method` hyperparameter (lora or full; "auto" picks full for
    # small encoders). False: always a LoRA adapter.
    full_fine_tuning: bool = False
    # The LoRA base rate and where it comes from → this method's base rate and why; None: the same rate.
    learning_rate: Callable[[float, str], tuple[float, str]] | None = None
    # The method's own hyperparameters (fields of shared.platform.records.Hyperparameters) with their rules.
    settings: Callable[[Pick, Planned], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Kind:
    """The data a method trains on, and the worker code that reads and plans it (shared by the methods of
    that kind, e.g. every method on preference pairs)."""

    name: DataKind  # the `task` shared.data.formats gives a processed file of this data
    help: str  # what such a file holds, as errors and docs say it
    # "module:function" (path, filename) → the file's Examples, as the recipes and evaluators read them.
    reader: str
    # "module:function" preparing a job on this data: tokenize it with the model's template, resolve every
    # "auto" setting, count what the estimate prices (services.evaluator.prepare.Planner).
    planner: str


@dataclass(frozen=True)
class Method:
    """One training method: what the API accepts for it, how its settings and its estimate are chosen, what
    its job reports, and where its heavy parts are."""

    name: str  # the job's method.type
    summary: str  # its part of method.type's description, e.g. "dpo (preference pairs)"
    data_kind: Kind  # the data it trains on
    hyperparameters: type[CommonHyperparameters]  # the API schema of method.<name>.hyperparameters
    # Its hyperparameters that OpenAI's `method` object of a job shows, beside the three every method shows.
    shown: tuple[str, ...]
    rules: Rules
    workload: Callable[[str], Workload]  # "lora" or "full" → what the estimate prices
    result_columns: tuple[str, ...]  # the per-step metrics CSV (result file) of its jobs
    validation_metrics: tuple[str, ...]  # the validation figures its recipe reports at each epoch's end
    model_card_kind: str  # what the model card's first line calls its model
    # The inference its fine-tuned model answers: chat (POST /v1/chat/completions; also exportable merged)
    # or classification (POST /v1/classifications; exported as trained).
    serves: Literal["chat", "classification"]
    recipe: str  # "module:function" that trains it (services/trainer)
    # "module:function" evaluating its job: (settings, redis, storage, record, *, group_field, watch,
    # generation_rows, generations_key) → the report (services/evaluator).
    evaluator: str
    learning_rate_sweep: bool = False  # its recipe runs POST /v1/fine_tuning/jobs' learning-rate sweeps
    api_note: str | None = None  # the description of method.<name> in the API (None: none)


def load(path: str) -> Any:
    """The function a "module:function" path names (imported on the worker that calls it)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
