"""Direct preference optimisation (DPO) of a causal LM with LoRA on preference pairs: one readable loop.

Each example is a prompt with a chosen and a rejected reply (`shared.ml.preference_data`). The policy is the
base model with a LoRA adapter; the reference is the same model with the adapter disabled, so there is no
second copy of the weights in memory, and at step 0 (LoRA's B matrices start at zero) policy and reference
agree and the loss is log 2. The loss is the sigmoid DPO loss on summed reply log-probabilities
(`shared.ml.preference_metrics.dpo_loss`, with conservative-DPO label smoothing), a mean per pair across the
accumulation window and all processes, so gradient accumulation and batch size do not change what is
optimised.

Each step reports the DPO loss as train_loss and the reward accuracy (the share of pairs whose chosen reply
has the higher implicit reward) as train_accuracy; each epoch ends with `evaluate_preferences` on the
validation pairs. Hooks, stop actions, schedulers, early stopping (on the validation DPO loss), the seeded
data order, full-state checkpoints (with resuming from one) and the saved artifacts (`adapter/`,
`tokenizer/`) are those of the SFT recipe (`services.trainer.sft`), so the trainer task drives both the
same way.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig, TaskType, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, get_scheduler

from services.trainer.checkpointing import Checkpoints, CheckpointSink, LoopState
from services.trainer.loop import (
    SCHEDULERS,
    EarlyStopping,
    EpochShuffle,
    StepMetrics,
    StopAction,
    TrainingHooks,
    epoch_batches,
    stop_requested,
)
from shared.data.formats import Example
from shared.ml.chat_data import check_eos
from shared.ml.model_loading import generation_eos_ids, load_causal_lm, weights_dtype
from shared.ml.preference_data import (
    DEFAULT_GROUP_FIELD,
    collate_pairs,
    iter_preference_batches,
    tokenize_preferences,
)
from shared.ml.preference_metrics import dpo_loss, evaluate_preferences, pair_logps, summary
from shared.planning.estimate import count_optimizer_steps

log = logging.getLogger(__name__)


@dataclass
class DPOConfig:
    model_dir: Path
    output_dir: Path
    train_examples: list[Example]  # kind "preference": prompt messages, chosen, rejected
    valid_examples: list[Example] | None
    n_epochs: int
    batch_size: int  # pairs per micro-batch (each forward pass holds twice as many sequences)
    learning_rate: float
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: list[str] | None  # None: every linear layer
    max_seq_length: int  # per side: prompt + one reply
    seed: int
    beta: float = 0.1  # how far from the reference the policy may move: larger keeps it closer
    label_smoothing: float = 0.0  # conservative DPO: the assumed share of wrongly labelled pairs
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    scheduler: str = "linear"  # linear, cosine or constant (each after the warmup)
    early_stopping_patience: int | None = None  # epochs without a better validation DPO loss before stopping
    early_stopping_min_delta: float = 0.0
    group_field: str | None = DEFAULT_GROUP_FIELD  # Example.fields key reported by_group in validation
    # A learning-rate trial: stop after this many optimizer steps, measure the validation loss, save nothing.
    max_steps: int | None = None
    torch_threads: int = 0  # 0 leaves torch's setting; launchers may have set OMP_NUM_THREADS=1
    trust_remote_code: bool = False
    checkpoints: CheckpointSink | None = None  # where full-state checkpoints go (None: none are saved)
    resume_from: Path | None = None  # a checkpoint directory written by an earlier attempt of this run


@dataclass
class DPOResult:
    steps_completed: int
    total_steps: int
    trained_tokens: int  # non-pad tokens of both sides (the prompt counts twice: it is processed twice)
    stopped: StopAction | None  # why training ended before its last step (None: it ran them all)
    early_stopped: bool  # validation loss stopped improving (the adapter is saved)
    # step, train_loss, train_accuracy (reward accuracy), train_reward_margin, valid_loss,
    # valid_reward_accuracy, valid_reward_margin, valid_preference_accuracy (valid_* on epoch ends)
    metrics_rows: list[dict[str, Any]]
    warnings: list[str]  # data and template problems that do not stop training
    valid_report: dict[str, Any] | None = None  # the last full `evaluate_preferences` report
    trial_valid: dict[str, float] | None = None  # a max_steps trial's validation summary


def train_dpo(config: DPOConfig, hooks: TrainingHooks) -> DPOResult:
    """Train a LoRA adapter on preference pairs; save `adapter/` and `tokenizer/` under output_dir unless
    stopped without "save" or run as a max_steps trial."""
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    if not 0 <= config.label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), not {config.label_smoothing}")
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps)
    set_seed(config.seed)

    # Data checks before loading the weights (minutes for a large model): the stop token, then every pair.
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir, trust_remote_code=config.trust_remote_code)
    eos_ids = generation_eos_ids(config.model_dir, tokenizer, trust_remote_code=config.trust_remote_code)
    warnings = check_eos(tokenizer, eos_ids)
    tokenize = partial(
        tokenize_preferences, tokenizer, max_length=config.max_seq_length, eos_token_ids=eos_ids,
        group_field=config.group_field,
    )  # fmt: skip
    train, train_warnings = tokenize(config.train_examples)
    valid, valid_warnings = tokenize(config.valid_examples or [], dataset="validation")
    warnings += train_warnings + valid_warnings
    for warning in warnings:
        log.warning(warning)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    model = load_causal_lm(
        config.model_dir, trust_remote_code=config.trust_remote_code, dtype=weights_dtype(accelerator.device)
    )
    model = get_peft_model(model, _lora_config(config))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    loader = DataLoader(
        train,
        batch_size=config.batch_size,
        sampler=EpochShuffle(len(train), config.seed),
        # Its own generator: starting an epoch's iterator must not draw from the global RNG, which
        # dropout uses and a checkpoint restores.
        generator=torch.Generator().manual_seed(config.seed),
        collate_fn=partial(collate_pairs, pad_token_id=pad_id),
    )
    total_steps = count_optimizer_steps(
        len(train),
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
    accelerator.register_for_checkpointing(scheduler)
    steps_per_epoch = total_steps // config.n_epochs

    def validate() -> dict[str, Any]:
        # Every process evaluates the whole (small) set on its unwrapped model: no collectives.
        batches = iter_preference_batches(valid, config.batch_size, pad_id)
        return evaluate_preferences(accelerator.unwrap_model(model), batches, config.beta)

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
        model.train()
        window = _Window()
        consumed = state.batches_in_epoch if epoch == state.epoch else 0
        for batch in epoch_batches(accelerator, loader, epoch, consumed):
            consumed += 1
            with accelerator.accumulate(model):
                # The reference: the same weights with the adapter disabled, no graph kept. Through the
                # prepared model, so a sharded one (FSDP) gathers its weights as for the policy.
                with torch.no_grad(), accelerator.unwrap_model(model).disable_adapter():
                    reference, _ = pair_logps(model, batch)
                policy, _ = pair_logps(model, batch)
                losses, chosen_rewards, rejected_rewards = dpo_loss(
                    *policy.chunk(2), *reference.chunk(2), config.beta, config.label_smoothing
                )
                loss_sum = losses.sum()
                accelerator.backward(loss_sum)
                margins = chosen_rewards - rejected_rewards
                window.add(
                    loss_sum, (margins > 0).sum(), margins.sum(), len(losses), batch["attention_mask"].sum()
                )
                if accelerator.sync_gradients:
                    totals = accelerator.reduce(window.totals(), reduction="sum")
                    loss_total, n_won, margin_total, n_pairs, n_input = totals.tolist()
                    # Gradients hold summed pair losses, divided by the accumulation steps in
                    # accelerator.backward and averaged over processes: make them a mean per pair.
                    scale = config.gradient_accumulation_steps * accelerator.num_processes / n_pairs
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.mul_(scale)
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    learning_rate = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue

            step += 1
            trained_tokens += int(n_input)
            seconds = time.perf_counter() - window.started
            metrics = StepMetrics(
                step=step,
                total_steps=total_steps,
                epoch=step / steps_per_epoch,
                train_loss=loss_total / n_pairs,  # DPO loss per pair
                train_accuracy=n_won / n_pairs,  # reward accuracy: chosen reward > rejected reward
                learning_rate=learning_rate,
                grad_norm=float(grad_norm),
                tokens_per_second=n_input / seconds,
                trained_tokens=trained_tokens,
                step_seconds=seconds,
            )
            rows.append(
                {
                    "step": step,
                    "train_loss": metrics.train_loss,
                    "train_accuracy": metrics.train_accuracy,
                    "train_reward_margin": margin_total / n_pairs,
                    "valid_loss": None,
                    "valid_reward_accuracy": None,
                    "valid_reward_margin": None,
                    "valid_preference_accuracy": None,
                }
            )
            if accelerator.is_main_process:
                hooks.on_step(metrics)
            stopped = stop_requested(accelerator, hooks)
            if checkpoints.due(step, stopped):
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
        if valid:
            valid_report = validate()
            valid_metrics = summary(valid_report)
            for name in ("loss", "reward_accuracy", "reward_margin", "preference_accuracy"):
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

    result = DPOResult(
        step, total_steps, trained_tokens, stopped, early_stopping.stopped, rows, warnings, valid_report
    )
    if stopped in ("discard", "suspend"):  # a suspension's state is its checkpoint
        result.early_stopped = False
        return result
    if config.max_steps is not None:
        result.early_stopped = False
        if valid:
            result.valid_report = validate()
            result.trial_valid = summary(result.valid_report)
        return result
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        adapter_dir = config.output_dir / "adapter"
        accelerator.unwrap_model(model).save_pretrained(adapter_dir, safe_serialization=True)
        # peft adds a model card naming this machine's paths; the adapter is its config and weights.
        (adapter_dir / "README.md").unlink(missing_ok=True)
        tokenizer.save_pretrained(config.output_dir / "tokenizer")
    return result


class _Window:
    """Running sums over the micro-batches of one optimizer step."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.sums: list[torch.Tensor] = []

    def add(
        self,
        loss_sum: torch.Tensor,
        n_won: torch.Tensor,
        margin_sum: torch.Tensor,
        n_pairs: int,
        n_input: torch.Tensor,
    ) -> None:
        values = (loss_sum.detach(), n_won, margin_sum, torch.tensor(n_pairs), n_input)
        self.sums.append(torch.stack([v.double().to(loss_sum.device) for v in values]))

    def totals(self) -> torch.Tensor:
        return torch.stack(self.sums).sum(dim=0)


def _lora_config(config: DPOConfig) -> LoraConfig:
    # Every linear layer by default, as in the SFT recipe (services.trainer.sft._lora_config).
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules or "all-linear",
    )
