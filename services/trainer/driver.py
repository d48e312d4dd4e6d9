"""What every training recipe shares, once: the config, the optimizer, the seeded loader, the step count
and schedule, `accelerator.prepare`, checkpoints and resuming, the stop every process agrees on, early
stopping, step reporting and the saved adapter.

A recipe (services/trainer/recipes/) loads its tokenizer, data and model, then hands the driver only what
differs (`Recipe`): how a batch is put together, the loss of a micro-batch, and the validation. The same
code runs a 7B model on GPUs (devices and processes from accelerate) and a tiny model on a CPU in tests.

The loss of a step is a mean over the recipe's units (trainable tokens, examples, pairs) across the whole
accumulation window and all processes: each micro-batch's loss is summed, and the gradients are divided by
the window's units before the optimizer steps, so gradient accumulation and batch size do not change what
is optimised.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from peft import LoraConfig, PeftModel, TaskType
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase, get_scheduler

from services.trainer.checkpointing import Checkpoints, CheckpointSink, LoopState
from shared.ml.threads import SMALL_TRAINING_PARAMETERS, small_model_threads
from shared.planning.estimate import count_optimizer_steps

log = logging.getLogger(__name__)

FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel

# transformers' scheduler names, each with warmup: constant holds the rate after warming up.
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}

# discard: end without saving (cancel); save: end and keep what was trained (a budget reached);
# suspend: checkpoint and end, to carry on later from that checkpoint (preemption, pause).
StopAction = Literal["discard", "save", "suspend"]


@dataclass
class TrainConfig:
    """What every recipe is configured with; a recipe's config adds its method's own settings."""

    model_dir: Path
    output_dir: Path
    train_examples: list[Any]  # the recipe's kind of example (conversations, labelled texts, pairs)
    valid_examples: list[Any] | None
    n_epochs: int
    batch_size: int  # examples (packed rows, pairs) per micro-batch and process
    learning_rate: float
    max_seq_length: int
    seed: int
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None  # None: every linear layer
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    scheduler: str = "linear"  # linear, cosine or constant (each after the warmup)
    label_smoothing: float = 0.0
    early_stopping_patience: int | None = None  # epochs without a better validation loss before stopping
    early_stopping_min_delta: float = 0.0
    # A learning-rate trial: stop after this many optimizer steps, measure the validation loss, save nothing.
    max_steps: int | None = None
    torch_threads: int = 0  # 0 leaves torch's setting; launchers may have set OMP_NUM_THREADS=1
    trust_remote_code: bool = False
    checkpoints: CheckpointSink | None = None  # where full-state checkpoints go (None: none are saved)
    resume_from: Path | None = None  # a checkpoint directory written by an earlier attempt of this run


@dataclass
class TrainResult:
    steps_completed: int
    total_steps: int
    trained_tokens: int  # non-pad tokens fed to the model (a DPO prompt counts twice: it is processed twice)
    stopped: StopAction | None  # why training ended before its last step (None: it ran them all)
    early_stopped: bool  # validation loss stopped improving (the model is saved)
    # step, train_loss, train_accuracy, the recipe's own train_* figures, then valid_<name> for each of
    # its validation metrics (set on epoch ends)
    metrics_rows: list[dict[str, Any]]
    warnings: list[str]  # data and template problems that do not stop training
    valid_report: dict[str, Any] | None = None  # the last full validation report
    trial_valid: dict[str, float] | None = None  # a max_steps trial's validation summary
    saved: dict[str, str] = field(default_factory=dict)  # artifact name → directory or file under output_dir


@dataclass
class StepMetrics:
    step: int
    total_steps: int
    epoch: float  # fractional progress through the epochs
    train_loss: float  # per unit of the recipe (token, example, pair) over the step's accumulation window
    train_accuracy: float  # argmax == label (chosen reward > rejected) over the window's units
    learning_rate: float
    grad_norm: float  # before clipping
    tokens_per_second: float  # non-pad tokens (prompt and completion) per second of this step
    trained_tokens: int  # cumulative non-pad tokens
    step_seconds: float


class TrainingHooks(Protocol):
    def on_step(self, m: StepMetrics) -> None:
        """Called after every optimizer step (on the main process)."""

    def on_epoch_end(self, epoch: int, valid_metrics: dict[str, float] | None) -> None:
        """Called after each epoch (1-based) with the recipe's validation summary when there is valid data."""

    def should_stop(self) -> StopAction | None:
        """Checked after every optimizer step: "discard" (cancel) ends training without saving; "save"
        (a budget reached) ends it and saves the model trained so far; "suspend" (preemption, pause)
        ends it after a checkpoint, from which another attempt carries on."""


@dataclass
class Loss:
    """One micro-batch's loss, summed over its units, and the figures a step reports."""

    total: torch.Tensor  # the summed loss (with its graph): what backward sees
    weight: torch.Tensor  # its units (or their summed class weights): a step's loss is total / weight
    correct: torch.Tensor  # units the model gets right
    count: torch.Tensor  # units the accuracy is over
    tokens: torch.Tensor  # non-pad tokens fed to the model
    # The recipe's own figures, summed; each step reports them per unit of `count` in its row.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Recipe:
    """What a training method brings to the driver: only what differs between methods."""

    model: torch.nn.Module  # loaded, with what trains (an adapter, a head) in place
    train: Sequence[Any] | Dataset  # one item per example (or packed row)
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]  # the batch shape
    loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], Loss]  # of the prepared model on a batch
    validate: Callable[[torch.nn.Module], dict[str, Any]] | None  # a full report (None: no valid data)
    validation_metrics: tuple[str, ...]  # the report's figures each epoch's last row holds, as valid_<name>
    save: Callable[[torch.nn.Module], dict[str, str]]  # the trained model's artifacts (main process)
    summary: Callable[[dict[str, Any]], dict[str, float]] = dict  # a report's figures for the hooks
    shuffle: bool = True  # False: the dataset is already in this epoch's order (packed rows)
    start_epoch: Callable[[int], None] | None = None  # called before each epoch (1-based)
    warnings: list[str] = field(default_factory=list)


def setup(config: TrainConfig) -> Accelerator:
    """The process's accelerator and seed, before anything is loaded (a fresh head's weights draw from it)."""
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps)
    set_seed(config.seed)
    return accelerator


def lora_config(
    config: TrainConfig, task_type: TaskType = TaskType.CAUSAL_LM, modules_to_save: list[str] | None = None
) -> LoraConfig:
    # Every linear layer by default, as QLoRA showed and Axolotl/Unsloth default to: adapters on the
    # attention projections alone (peft's default) learn markedly less for the same rank.
    return LoraConfig(
        task_type=task_type,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules or "all-linear",
        modules_to_save=modules_to_save,
    )


def save_adapter(model: PeftModel, tokenizer: PreTrainedTokenizerBase, output_dir: Path) -> dict[str, str]:
    """`adapter/` (its config and weights) and `tokenizer/` under output_dir."""
    adapter_dir = output_dir / "adapter"
    model.save_pretrained(adapter_dir, safe_serialization=True)
    # peft adds a model card naming this machine's paths; the adapter is its config and weights.
    (adapter_dir / "README.md").unlink(missing_ok=True)
    tokenizer.save_pretrained(output_dir / "tokenizer")
    return {"adapter": str(adapter_dir), "tokenizer": str(output_dir / "tokenizer")}


def drive(recipe: Recipe, config: TrainConfig, hooks: TrainingHooks, accelerator: Accelerator) -> TrainResult:
    """Train `recipe.model` on `recipe.train`; save it (`recipe.save`) unless stopped with "discard" or
    "suspend" (which saves a checkpoint instead) or run as a max_steps trial. A small model on CPU trains
    on one thread (shared/ml/threads.py)."""
    with small_model_threads(recipe.model, SMALL_TRAINING_PARAMETERS):
        return _drive(recipe, config, hooks, accelerator)


def _drive(
    recipe: Recipe, config: TrainConfig, hooks: TrainingHooks, accelerator: Accelerator
) -> TrainResult:
    model = recipe.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        # One kernel per step over all the weights instead of a loop of ops per tensor: torch's default on
        # a CPU is that loop, 0.52 s a step for MiniLM's 22.7M weights against 0.14 s fused (a fifth of a
        # full fine-tune's step); the same update to within float rounding (1.5e-8 after 10 steps).
        fused=all(p.device.type in FUSED_ADAMW_DEVICES for p in trainable),
    )
    if recipe.shuffle:
        loader = DataLoader(
            recipe.train,
            batch_size=config.batch_size,
            sampler=EpochShuffle(len(recipe.train), config.seed),
            # Its own generator: starting an epoch's iterator must not draw from the global RNG, which
            # dropout uses and a checkpoint restores.
            generator=torch.Generator().manual_seed(config.seed),
            collate_fn=recipe.collate,
        )
    else:
        loader = DataLoader(
            recipe.train, batch_size=config.batch_size, shuffle=False, collate_fn=recipe.collate
        )
    total_steps = count_optimizer_steps(
        len(recipe.train),
        config.batch_size,
        config.gradient_accumulation_steps,
        config.n_epochs,
        accelerator.num_processes,
    )
    # Not passed to prepare(): accelerate's scheduler wrapper steps once per process per call.
    scheduler = get_scheduler(
        SCHEDULERS[config.scheduler],
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    accelerator.register_for_checkpointing(scheduler)
    steps_per_epoch = total_steps // config.n_epochs

    checkpoints = Checkpoints(accelerator, config.checkpoints, config.output_dir / "checkpoints")
    checkpoints.save_trainable_only(model)
    state = checkpoints.resume(config.resume_from) if config.resume_from else LoopState()
    step, trained_tokens, rows = state.step, state.trained_tokens, state.rows
    stopped: StopAction | None = None
    valid_report: dict[str, Any] | None = None
    early_stopping = EarlyStopping(
        config.early_stopping_patience,
        config.early_stopping_min_delta,
        state.best_valid_loss,
        state.bad_epochs,
    )
    for epoch in range(state.epoch, config.n_epochs + 1):
        if recipe.start_epoch is not None:
            recipe.start_epoch(epoch)
        model.train()
        window = _Window()
        consumed = state.batches_in_epoch if epoch == state.epoch else 0
        for batch in _epoch_batches(accelerator, loader, epoch, consumed):
            consumed += 1
            with accelerator.accumulate(model):
                loss = recipe.loss(model, batch)
                if deepspeed:
                    # DeepSpeed steps inside backward(): the loss is made per unit of this micro-batch up
                    # front (its mean over the window and processes, a close stand-in for per-unit).
                    accelerator.backward(loss.total / loss.weight.float().clamp(min=1e-6))
                else:
                    accelerator.backward(loss.total)
                window.add(loss)
                if accelerator.sync_gradients:
                    totals = accelerator.reduce(window.totals(), reduction="sum").tolist()
                    total, weight, correct, count, tokens = totals[:5]
                    # Gradients hold the summed losses, divided by the accumulation steps inside
                    # accelerator.backward and averaged over processes; make them a mean per unit.
                    scale = config.gradient_accumulation_steps * accelerator.num_processes / weight
                    for p in model.parameters():
                        if p.grad is not None and not deepspeed:
                            p.grad.mul_(scale)
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    learning_rate = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue

            step += 1
            trained_tokens += int(tokens)
            seconds = time.perf_counter() - window.started
            metrics = StepMetrics(
                step=step,
                total_steps=total_steps,
                epoch=step / steps_per_epoch,
                train_loss=total / weight,
                train_accuracy=correct / count,
                learning_rate=learning_rate,
                grad_norm=math.nan if grad_norm is None else float(grad_norm),
                tokens_per_second=tokens / seconds,
                trained_tokens=trained_tokens,
                step_seconds=seconds,
            )
            rows.append(
                {"step": step, "train_loss": metrics.train_loss, "train_accuracy": metrics.train_accuracy}
                | {name: value / count for name, value in zip(window.extras, totals[5:], strict=True)}
                | {f"valid_{name}": None for name in recipe.validation_metrics}
            )
            if accelerator.is_main_process:
                hooks.on_step(metrics)
            stopped = _agreed_stop(accelerator, hooks)
            if checkpoints.due(step, suspend=stopped == "suspend"):
                checkpoints.save(
                    LoopState(step, epoch, consumed, trained_tokens, rows, early_stopping.best_or_none,
                              early_stopping.bad_epochs)
                )  # fmt: skip
            if stopped or step == config.max_steps:
                break
            window = _Window()
        if stopped or step == config.max_steps:
            break

        valid_metrics = None
        if recipe.validate is not None:
            # Every process evaluates the whole (small) set on its unwrapped model: no collectives, no
            # process left waiting at a barrier while another evaluates.
            valid_report = recipe.validate(accelerator.unwrap_model(model))
            valid_metrics = recipe.summary(valid_report)
            for name in recipe.validation_metrics:
                rows[-1][f"valid_{name}"] = valid_report[name]
        if accelerator.is_main_process:
            hooks.on_epoch_end(epoch, valid_metrics)
        if valid_metrics is not None and early_stopping.should_stop(valid_metrics["loss"]):
            log.info(
                "early stopping after epoch %d: no better validation loss in %d epochs",
                epoch,
                early_stopping.patience,
            )
            break

    result = TrainResult(
        step,
        total_steps,
        trained_tokens,
        stopped,
        early_stopping.stopped,
        rows,
        recipe.warnings,
        valid_report,
    )
    if stopped in ("discard", "suspend"):  # a suspension's state is its checkpoint
        result.early_stopped = False
        return result
    if config.max_steps is not None:
        result.early_stopped = False
        if recipe.validate is not None:
            result.valid_report = recipe.validate(accelerator.unwrap_model(model))
            result.trial_valid = recipe.summary(result.valid_report)
        return result
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        result.saved = recipe.save(accelerator.unwrap_model(model))
    return result


class EarlyStopping:
    """Stop when `patience` epochs in a row bring no validation loss below the best by `min_delta`."""

    def __init__(
        self, patience: int | None, min_delta: float, best: float | None = None, bad_epochs: int = 0
    ) -> None:
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


def _agreed_stop(accelerator: Accelerator, hooks: TrainingHooks) -> StopAction | None:
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


def _epoch_batches(accelerator: Accelerator, loader: DataLoader, epoch: int, skip: int = 0) -> DataLoader:
    """A prepared loader's batches for `epoch`, less the first `skip` (consumed before a checkpoint).

    accelerate passes the epoch on to the sampler (`EpochShuffle`) when iteration starts.
    """
    batches = accelerator.skip_first_batches(loader, skip) if skip else loader
    batches.set_epoch(epoch)
    return batches


class _Window:
    """Running sums over the micro-batches of one optimizer step: the `Loss` figures, extras last."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.sums: list[torch.Tensor] = []
        self.extras: list[str] = []

    def add(self, loss: Loss) -> None:
        self.extras = list(loss.extras)
        values = (
            loss.total.detach(),
            loss.weight,
            loss.correct,
            loss.count,
            loss.tokens,
            *loss.extras.values(),
        )
        self.sums.append(torch.stack([v.double().to(loss.total.device) for v in values]))

    def totals(self) -> torch.Tensor:
        return torch.stack(self.sums).sum(dim=0)
