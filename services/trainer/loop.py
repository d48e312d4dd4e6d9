"""What every training recipe shares: the progress hooks the trainer task implements, how a stop
is agreed across processes, the learning-rate schedules, and early stopping."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from accelerate import Accelerator

# transformers' scheduler names, each with warmup: constant holds the rate after warming up.
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}

StopAction = Literal["discard", "save"]


@dataclass
class StepMetrics:
    step: int
    total_steps: int
    epoch: float  # fractional progress through the epochs
    train_loss: float  # per trainable token over the step's accumulation window
    train_accuracy: float  # argmax == label over the window's trainable tokens
    learning_rate: float
    grad_norm: float  # before clipping
    tokens_per_second: float  # non-pad tokens (prompt and completion) per second of this step
    trained_tokens: int  # cumulative non-pad tokens
    step_seconds: float


class TrainingHooks(Protocol):
    def on_step(self, m: StepMetrics) -> None:
        """Called after every optimizer step (on the main process)."""

    def on_epoch_end(self, epoch: int, valid_metrics: dict[str, float] | None) -> None:
        """Called after each epoch (1-based) with `evaluate_causal_lm` results when there is valid data."""

    def should_stop(self) -> StopAction | None:
        """Checked after every optimizer step: "discard" (cancel, preemption) ends training without
        saving; "save" (a budget reached) ends it and saves the adapter trained so far."""


class EarlyStopping:
    """Stop when `patience` epochs in a row bring no validation loss below the best by `min_delta`."""

    def __init__(self, patience: int | None, min_delta: float):
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.bad_epochs = 0
        self.stopped = False

    def should_stop(self, valid_loss: float) -> bool:
        if self.patience is None:
            return False
        if valid_loss < self.best - self.min_delta:
            self.best, self.bad_epochs = valid_loss, 0
        else:
            self.bad_epochs += 1
        self.stopped = self.bad_epochs >= self.patience
        return self.stopped


_STOP_CODES: dict[StopAction | None, float] = {None: 0.0, "save": 1.0, "discard": 2.0}


def stop_requested(accelerator: Accelerator, hooks: TrainingHooks) -> StopAction | None:
    """The main process's answer, shared with all processes so they stop at the same step."""
    action = hooks.should_stop() if accelerator.is_main_process else None
    code = accelerator.reduce(torch.tensor(_STOP_CODES[action], device=accelerator.device), reduction="max")
    return {0.0: None, 1.0: "save", 2.0: "discard"}[float(code)]
