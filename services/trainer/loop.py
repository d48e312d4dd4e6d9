"""What every training recipe shares: the progress hooks the trainer task implements, how a stop
is agreed across processes, the learning-rate schedules, and early stopping."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Sampler

# transformers' scheduler names, each with warmup: constant holds the rate after warming up.
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}

# discard: end without saving (cancel); save: end and keep what was trained (a budget reached);
# suspend: checkpoint and end, to carry on later from that checkpoint (preemption, pause).
StopAction = Literal["discard", "save", "suspend"]


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
        """Checked after every optimizer step: "discard" (cancel) ends training without saving; "save"
        (a budget reached) ends it and saves the adapter trained so far; "suspend" (preemption, pause)
        ends it after a checkpoint, from which another attempt carries on."""


class EarlyStopping:
    """Stop when `patience` epochs in a row bring no validation loss below the best by `min_delta`."""

    def __init__(
        self, patience: int | None, min_delta: float, best: float | None = None, bad_epochs: int = 0
    ):
        self.patience = patience
        self.min_delta = min_delta
        self.best = (
            math.inf if best is None else best
        )  # None: no validation yet (a resumed run passes its own)
        self.bad_epochs = bad_epochs
        self.stopped = False

    @property
    def best_or_none(self) -> float | None:
        return None if self.best == math.inf else self.best

    def should_stop(self, valid_loss: float) -> bool:
        if self.patience is None:
            return False
        if valid_loss < self.best - self.min_delta:
            self.best, self.bad_epochs = valid_loss, 0
        else:
            self.bad_epochs += 1
        self.stopped = self.bad_epochs >= self.patience
        return self.stopped


_STOP_CODES: dict[StopAction | None, float] = {None: 0.0, "save": 1.0, "suspend": 2.0, "discard": 3.0}


def stop_requested(accelerator: Accelerator, hooks: TrainingHooks) -> StopAction | None:
    """The main process's answer, shared with all processes so they stop at the same step."""
    action = hooks.should_stop() if accelerator.is_main_process else None
    code = accelerator.reduce(torch.tensor(_STOP_CODES[action], device=accelerator.device), reduction="max")
    return {code: action for action, code in _STOP_CODES.items()}[float(code)]


class EpochShuffle(Sampler[int]):
    """A new order of the examples each epoch, a function of (seed, epoch) alone.

    So a run resumed in the middle of epoch e sees the same order as the run it continues (a generator
    carried from epoch to epoch would restart at epoch 1's order), and every process agrees on it without
    sharing random state.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


def epoch_batches(accelerator: Accelerator, loader: DataLoader, epoch: int, skip: int = 0) -> DataLoader:
    """A prepared loader's batches for `epoch`, less the first `skip` (consumed before a checkpoint).

    accelerate passes the epoch on to the sampler (`EpochShuffle`) when iteration starts.
    """
    batches = accelerator.skip_first_batches(loader, skip) if skip else loader
    batches.set_epoch(epoch)
    return batches
