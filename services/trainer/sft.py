"""Supervised LoRA fine-tuning of a causal LM on chat examples: one readable training loop.

The same code runs a 7B model on GPUs (bf16 where supported, devices and processes from accelerate) and a
tiny model on a CPU in tests. Loss is per trainable token across the whole accumulation window (and all
processes), so gradient accumulation and batch size do not change what is optimised.

With `packing`, each micro-batch is `batch_size` rows of up to `max_seq_length` tokens, each row holding
several whole examples that cannot attend to each other (shared/ml/packing.py); the examples are shuffled
and packed again every epoch. With `token_cache`, tokenized datasets are kept in storage
(shared/ml/token_cache.py), so another run on the same data (a retry, a sweep trial) does not tokenize again.
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
from accelerate.utils import DistributedType, set_seed
from peft import LoraConfig, TaskType, get_peft_model
from torch.utils.data import DataLoader, Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, get_scheduler

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
from shared.ml import token_cache
from shared.ml.chat_data import (
    Messages,
    TokenizedExample,
    check_eos,
    collate,
    iter_batches,
    keep_trainable,
    tokenize_all,
    tokenize_dataset,
)
from shared.ml.lm_metrics import TokenStats, evaluate_causal_lm, token_stats
from shared.ml.model_loading import generation_eos_ids, load_causal_lm, weights_dtype
from shared.ml.packing import collate_packed, packing_mode
from shared.ml.token_cache import PREFIX as TOKEN_CACHE_PREFIX
from shared.planning.estimate import count_optimizer_steps
from shared.planning.packing import PackingStats, epoch_rows, packing_stats
from shared.platform.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    model_dir: Path
    output_dir: Path
    train_examples: list[Messages]
    valid_examples: list[Messages] | None
    n_epochs: int
    batch_size: int
    learning_rate: float
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: list[str] | None  # None: peft's default for the architecture, else all linear layers
    max_seq_length: int
    seed: int
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    scheduler: str = "linear"  # linear, cosine or constant (each after the warmup)
    early_stopping_patience: int | None = None  # epochs without a better validation loss before stopping
    early_stopping_min_delta: float = 0.0
    label_smoothing: float = 0.0
    # A learning-rate trial: stop after this many optimizer steps, measure the validation loss, save nothing.
    max_steps: int | None = None
    torch_threads: int = 0  # 0 leaves torch's setting; launchers may have set OMP_NUM_THREADS=1
    trust_remote_code: bool = False
    # Train on every token (prompts too), not only the assistant replies; validation stays on the replies.
    train_on_inputs: bool = False
    # Pack examples into rows of max_seq_length tokens (batch_size rows per micro-batch); falls back to
    # padded batches, with a warning, when the model's attention implementation cannot isolate examples.
    packing: bool = False
    token_cache: Storage | None = None  # keep tokenized datasets here and reuse them (None: no cache)
    token_cache_prefix: str = TOKEN_CACHE_PREFIX  # where in token_cache, e.g. under the tenant's prefix
    checkpoints: CheckpointSink | None = None  # where full-state checkpoints go (None: none are saved)
    resume_from: Path | None = None  # a checkpoint directory written by an earlier attempt of this run
    # Where each example is in its file ("line 7", "item 7"), for the skipped ones' warning and errors
    # (None: line i + 1).
    train_sources: list[str] | None = None
    valid_sources: list[str] | None = None


@dataclass
class SFTResult:
    steps_completed: int
    total_steps: int
    trained_tokens: int
    stopped: StopAction | None  # why training ended before its last step (None: it ran them all)
    early_stopped: bool  # validation loss stopped improving (the adapter is saved)
    metrics_rows: list[
        dict[str, Any]
    ]  # step, train_loss, train_accuracy, valid_loss, valid_mean_token_accuracy
    warnings: list[str]  # data and template problems that do not stop training
    trial_valid: dict[str, float] | None = None  # a max_steps trial's validation metrics
    packing: PackingStats | None = None  # rows per epoch and fill when training was packed, else None


def train_sft(config: SFTConfig, hooks: TrainingHooks) -> SFTResult:
    """Train a LoRA adapter; save `adapter/` and `tokenizer/` under output_dir unless stopped early."""
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps)
    set_seed(config.seed)

    # Data checks before loading the weights (minutes for a large model): the stop token, then that
    # every example has something to learn.
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir, trust_remote_code=config.trust_remote_code)
    eos_ids = generation_eos_ids(config.model_dir, tokenizer, trust_remote_code=config.trust_remote_code)
    warnings = check_eos(tokenizer, eos_ids)
    # Validation is always on the replies alone, as the evaluator measures it: one meaning of valid_loss.
    # Examples truncation leaves nothing to learn are skipped (`chat_data.Skipped`), as the estimate said.
    train, train_warnings = _tokenize(
        config,
        tokenizer,
        eos_ids,
        config.train_examples,
        config.train_sources,
        "training",
        config.train_on_inputs,
    )
    valid, valid_warnings = _tokenize(
        config, tokenizer, eos_ids, config.valid_examples or [], config.valid_sources, "validation", False
    )
    warnings += train_warnings + valid_warnings
    for warning in warnings:
        log.warning(warning)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    model = load_causal_lm(
        config.model_dir, trust_remote_code=config.trust_remote_code, dtype=weights_dtype(accelerator.device)
    )
    weights = next(model.parameters())  # the float mask of eager attention takes the weights' dtype
    mode = packing_mode(model.config._attn_implementation) if config.packing else None
    if config.packing and mode is None:
        warning = (
            f"packing is not supported with the {model.config._attn_implementation!r} attention "
            "implementation (it cannot keep packed examples from attending to each other); training on "
            "padded batches instead"
        )
        log.warning(warning)
        warnings.append(warning)
    model = get_peft_model(model, _lora_config(config))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    packed: _PackedEpochs | None = None
    if mode is None:
        loader = DataLoader(
            train,
            batch_size=config.batch_size,
            sampler=EpochShuffle(len(train), config.seed),
            # Its own generator: starting an epoch's iterator must not draw from the global RNG, which
            # dropout uses and a checkpoint restores.
            generator=torch.Generator().manual_seed(config.seed),
            collate_fn=partial(collate, pad_token_id=pad_id),
        )
    else:
        # The rows are already in a shuffled order (new each epoch): the loader keeps it.
        packed = _PackedEpochs(train, config.max_seq_length, config.seed)
        log.info(
            "packing %d examples into %d rows of %d tokens (%.1f%% full, %s)", len(train), packed.stats.rows,
            config.max_seq_length, 100 * packed.stats.fill_ratio, model.config._attn_implementation,
        )  # fmt: skip
        loader = DataLoader(
            packed,
            batch_size=config.batch_size,
            shuffle=False,
            collate_fn=partial(collate_packed, pad_token_id=pad_id, mode=mode, dtype=weights.dtype),
        )
    total_steps = count_optimizer_steps(
        len(loader.dataset),  # examples, or packed rows per epoch
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
    early_stopping = EarlyStopping(
        config.early_stopping_patience,
        config.early_stopping_min_delta,
        state.best_valid_loss,
        state.bad_epochs,
    )
    for epoch in range(state.epoch, config.n_epochs + 1):
        if packed is not None:
            packed.repack(epoch)
        model.train()
        window = _Window()
        consumed = state.batches_in_epoch if epoch == state.epoch else 0
        for batch in epoch_batches(accelerator, loader, epoch, consumed):
            consumed += 1
            with accelerator.accumulate(model):
                # Logits passed inline: no reference keeps the (large) tensor alive into the next forward.
                # Packed batches add position_ids (reset per example) and a 4-D mask, or no mask at all.
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
                logits = model(**inputs, use_cache=False).logits
                stats = token_stats(logits, batch["labels"], config.label_smoothing)
                del logits
                if deepspeed:
                    # DeepSpeed steps inside backward(): the loss is made per token of this micro-batch
                    # up front (its mean over the window and processes, a close stand-in for per-token).
                    accelerator.backward(stats.loss_sum / stats.n_tokens.clamp(min=1))
                else:
                    accelerator.backward(stats.loss_sum)
                real = batch["token_mask"] if "token_mask" in batch else batch["attention_mask"]
                window.add(stats, real.sum())
                if accelerator.sync_gradients:
                    totals = accelerator.reduce(window.totals(), reduction="sum")
                    loss_sum, n_correct, n_tokens, n_input = totals.tolist()
                    # Gradients hold the summed token losses, divided by the accumulation steps inside
                    # accelerator.backward and averaged over processes; make them per trainable token.
                    scale = config.gradient_accumulation_steps * accelerator.num_processes / n_tokens
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
            trained_tokens += int(n_input)
            seconds = time.perf_counter() - window.started
            metrics = StepMetrics(
                step=step,
                total_steps=total_steps,
                epoch=step / steps_per_epoch,
                train_loss=loss_sum / n_tokens,
                train_accuracy=n_correct / n_tokens,
                learning_rate=learning_rate,
                grad_norm=math.nan if grad_norm is None else float(grad_norm),
                tokens_per_second=n_input / seconds,
                trained_tokens=trained_tokens,
                step_seconds=seconds,
            )
            rows.append(
                {
                    "step": step,
                    "train_loss": metrics.train_loss,
                    "train_accuracy": metrics.train_accuracy,
                    "valid_loss": None,
                    "valid_mean_token_accuracy": None,
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
            # Every process evaluates the whole (small) set on its unwrapped model: no collectives, no
            # process left waiting at a barrier while another evaluates.
            batches = iter_batches(valid, config.batch_size, pad_id)
            valid_metrics = evaluate_causal_lm(accelerator.unwrap_model(model), batches)
            rows[-1]["valid_loss"] = valid_metrics["loss"]
            rows[-1]["valid_mean_token_accuracy"] = valid_metrics["mean_token_accuracy"]
        if accelerator.is_main_process:
            hooks.on_epoch_end(epoch, valid_metrics)
        if valid_metrics is not None and early_stopping.should_stop(valid_metrics["loss"]):
            log.info(
                "early stopping after epoch %d: no better validation loss in %d epochs",
                epoch,
                early_stopping.patience,
            )
            break

    stats = packed.stats if packed is not None else None
    if stopped in ("discard", "suspend"):
        return SFTResult(step, total_steps, trained_tokens, stopped, False, rows, warnings, packing=stats)
    if config.max_steps is not None:
        trial = evaluate_causal_lm(
            accelerator.unwrap_model(model), iter_batches(valid, config.batch_size, pad_id)
        )
        return SFTResult(step, total_steps, trained_tokens, None, False, rows, warnings, trial, stats)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        adapter_dir = config.output_dir / "adapter"
        accelerator.unwrap_model(model).save_pretrained(adapter_dir, safe_serialization=True)
        # peft adds a model card naming this machine's paths; the adapter is its config and weights.
        (adapter_dir / "README.md").unlink(missing_ok=True)
        tokenizer.save_pretrained(config.output_dir / "tokenizer")
    return SFTResult(
        step, total_steps, trained_tokens, stopped, early_stopping.stopped, rows, warnings, packing=stats
    )


def _tokenize(
    config: SFTConfig,
    tokenizer: PreTrainedTokenizerBase,
    eos_ids: set[int],
    conversations: list[Messages],
    sources: list[str] | None,
    dataset: str,
    train_on_inputs: bool,
) -> tuple[list[TokenizedExample], list[str]]:
    """`tokenize_dataset`, through the token cache when there is one (it holds every example, skipped
    ones too); the checks run either way."""
    if config.token_cache is None or not conversations:
        return tokenize_dataset(
            tokenizer, conversations, config.max_seq_length, eos_token_ids=eos_ids, dataset=dataset,
            train_on_inputs=train_on_inputs, sources=sources,
        )  # fmt: skip
    key = token_cache.cache_key(
        token_cache.data_sha256(conversations), tokenizer, config.max_seq_length, train_on_inputs,
        eos_token_ids=eos_ids,
    )  # fmt: skip
    examples = token_cache.load(config.token_cache, key, prefix=config.token_cache_prefix)
    if examples is not None and len(examples) == len(conversations):
        log.info("%s data: %d tokenized examples from the cache (%s)", dataset, len(examples), key)
    else:
        examples = tokenize_all(
            tokenizer, conversations, config.max_seq_length, eos_token_ids=eos_ids, dataset=dataset,
            train_on_inputs=train_on_inputs, sources=sources,
        )  # fmt: skip
        token_cache.save(config.token_cache, key, examples, prefix=config.token_cache_prefix)
    return keep_trainable(examples, conversations, dataset=dataset, sources=sources)


class _PackedEpochs(Dataset):
    """The packed rows of the current epoch (`repack` before each): item i is row i's examples."""

    def __init__(self, examples: list[TokenizedExample], max_seq_length: int, seed: int) -> None:
        self.examples = examples
        self.lengths = [len(example.input_ids) for example in examples]
        self.max_seq_length = max_seq_length
        self.seed = seed
        self.stats = packing_stats(self.lengths, max_seq_length)  # the same every epoch
        self.rows: list[list[int]] = []
        self.repack(1)

    def repack(self, epoch: int) -> None:
        self.rows = epoch_rows(self.lengths, self.max_seq_length, self.seed, epoch)

    def __len__(self) -> int:
        return self.stats.rows

    def __getitem__(self, i: int) -> list[TokenizedExample]:
        return [self.examples[j] for j in self.rows[i]]


class _Window:
    """Running sums over the micro-batches of one optimizer step."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.sums: list[torch.Tensor] = []

    def add(self, stats: TokenStats, n_input: torch.Tensor) -> None:
        values = (stats.loss_sum.detach(), stats.n_correct, stats.n_tokens, n_input)
        self.sums.append(torch.stack([v.double() for v in values]))

    def totals(self) -> torch.Tensor:
        return torch.stack(self.sums).sum(dim=0)


def _lora_config(config: SFTConfig) -> LoraConfig:
    # Every linear layer by default, as QLoRA showed and Axolotl/Unsloth default to: adapters on the
    # attention projections alone (peft's default) learn markedly less for the same rank.
    target_modules: list[str] | str = config.target_modules or "all-linear"
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules,
    )
