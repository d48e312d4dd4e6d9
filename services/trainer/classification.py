"""Text classification: an encoder or decoder model with a classification head, one readable training loop.

The classic AutoTrain task. Labels come from the training data (`shared.ml.classification_data`); the model is
`AutoModelForSequenceClassification` with that many classes and their names in its config. Two methods:

- "full": every weight trains (the usual choice for encoders of up to ~150M parameters: BERT, MiniLM,
  DeBERTa), in fp32;
- "lora": a LoRA adapter on every linear layer plus the (fresh) classification head, trained and saved
  whole through peft's `modules_to_save` (the choice for decoder LLMs, which the head reads at the last
  non-pad token, so the config gets a pad_token_id).

"auto" picks full for masked-LM encoders up to FULL_FINE_TUNE_MAX_PARAMS and LoRA otherwise. Hooks, stop
actions, schedulers, early stopping, the seeded data order and full-state checkpoints (with resuming from
one) are those of the SFT recipe (`services.trainer.sft`), so the trainer task drives both the same way. Loss is cross-entropy per example
(optionally class-weighted and label-smoothed), normalised across the accumulation window and processes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig, TaskType, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

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
from shared.ml.classification_data import (
    DEFAULT_GROUP_FIELD,
    class_weights,
    collate_classification,
    is_encoder,
    iter_classification_batches,
    label_vocabulary,
    pad_token_id,
    tokenize_classification,
    write_labels,
)
from shared.ml.classification_metrics import evaluate_classifier, summary
from shared.ml.model_loading import weights_dtype
from shared.planning.estimate import count_optimizer_steps
from shared.planning.hyperparams import FULL_FINE_TUNE_MAX_PARAMS

log = logging.getLogger(__name__)

Method = Literal["auto", "full", "lora"]

HEAD_NAMES = ("classifier", "score")  # transformers' names for the classification head


@dataclass
class ClassificationConfig:
    model_dir: Path
    output_dir: Path
    train_examples: list[Example]  # kind "classification": text, label (a string), fields
    valid_examples: list[Example] | None
    n_epochs: int
    batch_size: int
    learning_rate: float
    max_seq_length: int
    seed: int
    method: Method = "auto"
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    scheduler: str = "linear"  # linear, cosine or constant (each after the warmup)
    label_smoothing: float = 0.0
    class_weights: Literal["none", "balanced"] = "none"
    early_stopping_patience: int | None = None  # epochs without a better validation loss before stopping
    early_stopping_min_delta: float = 0.0
    lora_r: int = 16  # method "lora" only
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None  # None: every linear layer but the head
    group_field: str | None = DEFAULT_GROUP_FIELD  # Example.fields key reported by_group in validation
    # A learning-rate trial: stop after this many optimizer steps, measure the validation loss, save nothing.
    max_steps: int | None = None
    torch_threads: int = 0  # 0 leaves torch's setting; launchers may have set OMP_NUM_THREADS=1
    trust_remote_code: bool = False
    checkpoints: CheckpointSink | None = None  # where full-state checkpoints go (None: none are saved)
    resume_from: Path | None = None  # a checkpoint directory written by an earlier attempt of this run


@dataclass
class ClassificationResult:
    steps_completed: int
    total_steps: int
    trained_tokens: int
    stopped: StopAction | None  # why training ended before its last step (None: it ran them all)
    early_stopped: bool  # validation loss stopped improving (the model is saved)
    # step, train_loss, train_accuracy, valid_loss, valid_accuracy, valid_macro_f1 (valid_* on epoch ends)
    metrics_rows: list[dict[str, Any]]
    warnings: list[str]  # data problems that do not stop training (truncation)
    labels: list[str]  # class id i is labels[i] (also in labels.json and the model config)
    method: Literal["full", "lora"]  # what "auto" resolved to
    valid_report: dict[str, Any] | None = None  # the last full `evaluate_classifier` report
    trial_valid: dict[str, float] | None = None  # a max_steps trial's validation summary
    saved: dict[str, str] = field(default_factory=dict)  # artifact name → directory or file under output_dir


def train_classification(config: ClassificationConfig, hooks: TrainingHooks) -> ClassificationResult:
    """Fine-tune a classifier; save it under output_dir unless stopped with "discard" or "suspend" (which
    saves a checkpoint instead) or run as a max_steps trial:

    - `model/` (method "full": config with id2label, safetensors weights) or `adapter/` (method "lora":
      the adapter and the head);
    - `tokenizer/`, and `labels.json` ({"labels": [...], "id2label": ..., "method", "base_model_type",
      "pad_token_id", "max_seq_length"}).
    """
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    if config.class_weights not in ("none", "balanced"):
        raise ValueError(f"class_weights must be 'none' or 'balanced', not {config.class_weights!r}")
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps)
    set_seed(config.seed)

    # Data checks before loading the weights: labels, then every example tokenized.
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir, trust_remote_code=config.trust_remote_code)
    labels = label_vocabulary(config.train_examples)
    tokenize = partial(
        tokenize_classification, tokenizer, labels=labels, max_length=config.max_seq_length,
        group_field=config.group_field,
    )  # fmt: skip
    train, warnings = tokenize(config.train_examples)
    valid, valid_warnings = tokenize(config.valid_examples or [], dataset="validation")
    warnings += valid_warnings
    for warning in warnings:
        log.warning(warning)
    pad_id = pad_token_id(tokenizer)
    if tokenizer.pad_token_id is None:  # decoders: pad with EOS (saved with the tokenizer)
        tokenizer.pad_token = tokenizer.eos_token

    model = AutoModelForSequenceClassification.from_pretrained(
        config.model_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        pad_token_id=pad_id,
        use_safetensors=True,
        trust_remote_code=config.trust_remote_code,
        # fp32 for full fine-tuning (AdamW on bf16 weights loses small updates); LoRA trains fp32 adapters
        # on frozen bf16 weights where the GPU supports it, as the SFT recipe does.
        dtype=torch.float32 if _resolve_method(config, None) == "full" else weights_dtype(accelerator.device),
    )
    method = _resolve_method(config, model)
    if method == "lora":
        model = get_peft_model(model, _lora_config(config, model))
    weights = class_weights(train, len(labels)) if config.class_weights == "balanced" else None
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
        collate_fn=partial(collate_classification, pad_token_id=pad_id),
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
    if weights is not None:
        weights = weights.to(accelerator.device)
    steps_per_epoch = total_steps // config.n_epochs

    def validate() -> dict[str, Any]:
        # Every process evaluates the whole (small) set on its unwrapped model: no collectives.
        batches = iter_classification_batches(valid, config.batch_size, pad_id)
        return evaluate_classifier(accelerator.unwrap_model(model), batches, labels)

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
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss_sum, weight_sum, n_correct = _loss_terms(
                    logits.float(), batch["labels"], weights, config.label_smoothing
                )
                del logits
                accelerator.backward(loss_sum)
                window.add(
                    loss_sum, weight_sum, n_correct, len(batch["labels"]), batch["attention_mask"].sum()
                )
                if accelerator.sync_gradients:
                    totals = accelerator.reduce(window.totals(), reduction="sum")
                    loss_total, weight_total, correct, n_examples, n_input = totals.tolist()
                    # Gradients hold summed (weighted) example losses, divided by the accumulation steps in
                    # accelerator.backward and averaged over processes: make them a weighted mean per example.
                    scale = config.gradient_accumulation_steps * accelerator.num_processes / weight_total
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
                train_loss=loss_total / weight_total,
                train_accuracy=correct / n_examples,  # examples whose argmax is their label
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
                    "valid_loss": None,
                    "valid_accuracy": None,
                    "valid_macro_f1": None,
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
            rows[-1]["valid_loss"] = valid_report["loss"]
            rows[-1]["valid_accuracy"] = valid_report["accuracy"]
            rows[-1]["valid_macro_f1"] = valid_report["macro_f1"]
        if accelerator.is_main_process:
            hooks.on_epoch_end(epoch, valid_metrics)
        if valid_metrics is not None and early_stopping.should_stop(valid_metrics["loss"]):
            log.info(
                "early stopping after epoch %d: no better validation loss in %d epochs",
                epoch,
                early_stopping.patience,
            )
            break

    result = ClassificationResult(
        step, total_steps, trained_tokens, stopped, early_stopping.stopped, rows, warnings, labels, method,
        valid_report,
    )  # fmt: skip
    if stopped in ("discard", "suspend"):
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
        result.saved = _save(config, accelerator.unwrap_model(model), tokenizer, labels, method, pad_id)
    return result


def _resolve_method(config: ClassificationConfig, model: torch.nn.Module | None) -> Literal["full", "lora"]:
    """The method "auto" stands for; before the model is loaded (model None), "auto" answers from the
    config alone whether weights will be fully trained (an encoder architecture)."""
    if config.method in ("full", "lora"):
        return config.method
    if config.method != "auto":
        raise ValueError(f"method must be 'auto', 'full' or 'lora', not {config.method!r}")
    from transformers import AutoConfig

    model_config = (
        model.config
        if model is not None
        else AutoConfig.from_pretrained(config.model_dir, trust_remote_code=config.trust_remote_code)
    )
    if not is_encoder(model_config):
        return "lora"
    if model is None:
        return "full"  # provisional: the size is known once loaded
    n_params = sum(p.numel() for p in model.parameters())
    return "full" if n_params <= FULL_FINE_TUNE_MAX_PARAMS else "lora"


def _lora_config(config: ClassificationConfig, model: torch.nn.Module) -> LoraConfig:
    head = [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), torch.nn.Module)]
    if not head:
        raise ValueError(
            f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}; "
            "train it with method 'full'"
        )
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        # Every linear layer but the head (peft leaves it out for SEQ_CLS); the head trains whole.
        target_modules=config.target_modules or "all-linear",
        modules_to_save=head,
    )


def _loss_terms(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed weighted cross-entropy, summed weights, correct predictions) of one micro-batch.

    With class weights, each example's loss counts its class's weight, and the mean is over the weights
    (torch's `weight=` mean), so "balanced" changes which examples matter, not the loss's scale.
    """
    labels = labels.to(logits.device)
    per_example = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    example_weights = torch.ones_like(per_example) if weights is None else weights[labels]
    loss_sum = (per_example * example_weights).sum()
    n_correct = (logits.argmax(dim=-1) == labels).sum()
    return loss_sum, example_weights.sum().detach(), n_correct


class _Window:
    """Running sums over the micro-batches of one optimizer step."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.sums: list[torch.Tensor] = []

    def add(
        self,
        loss_sum: torch.Tensor,
        weight_sum: torch.Tensor,
        n_correct: torch.Tensor,
        n_examples: int,
        n_input: torch.Tensor,
    ) -> None:
        values = (loss_sum.detach(), weight_sum, n_correct, torch.tensor(n_examples), n_input)
        self.sums.append(torch.stack([v.double().to(loss_sum.device) for v in values]))

    def totals(self) -> torch.Tensor:
        return torch.stack(self.sums).sum(dim=0)


def _save(
    config: ClassificationConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    labels: list[str],
    method: str,
    pad_id: int,
) -> dict[str, str]:
    out = config.output_dir
    if method == "lora":
        weights_dir = out / "adapter"
        model.save_pretrained(weights_dir, safe_serialization=True)
        # peft adds a model card naming this machine's paths; the adapter is its config and weights.
        (weights_dir / "README.md").unlink(missing_ok=True)
        base_model_type = model.get_base_model().config.model_type
    else:
        weights_dir = out / "model"
        model.save_pretrained(weights_dir, safe_serialization=True)
        base_model_type = model.config.model_type
    tokenizer.save_pretrained(out / "tokenizer")
    labels_path = write_labels(
        out, labels, method=method, base_model_type=base_model_type, pad_token_id=pad_id,
        max_seq_length=config.max_seq_length,
    )  # fmt: skip
    return {
        "adapter" if method == "lora" else "model": str(weights_dir),
        "tokenizer": str(out / "tokenizer"),
        "labels": str(labels_path),
    }
