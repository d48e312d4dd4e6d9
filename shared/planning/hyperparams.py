"""The rules that turn "auto" hyperparameters into values, each with a one-line reason.

Every suggestion Tunery makes is written here, so a reader can find why a job got its settings.
"""

from __future__ import annotations

import math
from typing import Any

from shared.methods import Planned, method
from shared.planning.estimate import SUPERVISED, DataStats, Workload, peak_memory_gib, percentile
from shared.planning.gpu_classes import GpuClass
from shared.planning.model_facts import ModelFacts
from shared.platform.records import Hyperparameters, LoraSettings

# LoRA adapters train well around 1e-4..3e-4 across model sizes (QLoRA paper, Together/Axolotl
# defaults); the multiplier scales this, as OpenAI's `learning_rate_multiplier` does.
LORA_BASE_LEARNING_RATE = 2e-4

# OpenAI's heuristic (cookbook): 3 epochs, adjusted so examples × epochs lands in [100, 25 000].
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MAX_AUTO_EPOCHS = 25

# About 0.2 % of the examples per batch (OpenAI's default), between 1 and 8 for LoRA on one device.
AUTO_BATCH_FRACTION = 0.002
MAX_AUTO_BATCH_SIZE = 8


# Methods that may train every weight (classification): BERT's fine-tuning recipe for small encoders
# (Devlin et al. 2019: learning rates of 2e-5..5e-5, weight decay 0.01), every weight trained; larger
# encoders and decoders train a LoRA adapter (and a classifier's new head), at the LoRA rate.
FULL_FINE_TUNE_MAX_PARAMS = 150_000_000  # "auto" trains every weight of encoders up to this size
FULL_FINE_TUNE_LEARNING_RATE = 5e-5
FULL_FINE_TUNE_WEIGHT_DECAY = 0.01


def auto_epochs(n_examples: int) -> tuple[int, str]:
    n_examples = max(1, n_examples)
    epochs = TARGET_EPOCHS
    if n_examples * epochs < MIN_TARGET_EXAMPLES:
        epochs = min(MAX_AUTO_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n_examples))
    elif n_examples * epochs > MAX_TARGET_EXAMPLES:
        epochs = max(1, MAX_TARGET_EXAMPLES // n_examples)
    return epochs, (
        f"auto: {TARGET_EPOCHS} epochs adjusted so {n_examples} examples × epochs lands in "
        f"[{MIN_TARGET_EXAMPLES}, {MAX_TARGET_EXAMPLES}]"
    )


def auto_batch_size(n_examples: int) -> tuple[int, str]:
    size = max(1, min(MAX_AUTO_BATCH_SIZE, round(n_examples * AUTO_BATCH_FRACTION)))
    return (
        size,
        f"auto: ~{AUTO_BATCH_FRACTION:.1%} of {n_examples} examples, between 1 and {MAX_AUTO_BATCH_SIZE}",
    )


def auto_training_method(encoder: bool, n_params: int) -> tuple[str, str]:
    """Full fine-tuning for small encoders, else LoRA with the head trained whole."""
    size = f"{n_params / 1e6:.0f}M-parameter"
    if encoder and n_params <= FULL_FINE_TUNE_MAX_PARAMS:
        return "full", (
            f"auto: full fine-tuning, every weight of this {size} encoder trains (the usual choice up to "
            f"{FULL_FINE_TUNE_MAX_PARAMS / 1e6:.0f}M)"
        )
    kind = "encoder" if encoder else "decoder"
    return (
        "lora",
        f"auto: LoRA on every linear layer, and the classification head trained whole ({size} {kind})",
    )


def base_learning_rate_of(method_type: str, training: str, catalog_rate: float | None) -> tuple[float, str]:
    """The rate the multiplier scales, and where it comes from (`training`: lora or full)."""
    if training == "full":
        return (
            FULL_FINE_TUNE_LEARNING_RATE,
            "full fine-tuning of a small encoder: the top of BERT's 2e-5..5e-5",
        )
    base, source = (
        (catalog_rate, "the model's base rate in the catalog")
        if catalog_rate is not None
        else (LORA_BASE_LEARNING_RATE, "the LoRA base rate")
    )
    own_rate = method(method_type).rules.learning_rate
    return own_rate(base, source) if own_rate is not None else (base, source)


# Sequence length: the 99th percentile of the data's token lengths, rounded up to a multiple of 64,
# capped by the model's configured context. Longer examples are truncated (the estimate counts them).
SEQ_LEN_PERCENTILE = 0.99
SEQ_LEN_MULTIPLE = 64
# A short linear warmup steadies Adam's first steps (3 %: the common LoRA default, e.g. Axolotl/TRL).
AUTO_WARMUP_RATIO = 0.03
# Peak memory may use this share of a device; the rest is headroom for fragmentation.
MEMORY_HEADROOM = 0.9
# Early stopping on validation loss, when there is validation data and at least 3 epochs to stop in.
AUTO_EARLY_STOPPING_PATIENCE = 2
SCHEDULERS = ("linear", "cosine", "constant")


def auto_max_seq_length(lengths: list[int], context: int) -> tuple[int, str]:
    p99 = percentile(lengths, SEQ_LEN_PERCENTILE)
    length = min(context, max(SEQ_LEN_MULTIPLE, math.ceil(p99 / SEQ_LEN_MULTIPLE) * SEQ_LEN_MULTIPLE))
    return length, (
        f"auto: p99 of the training tokens ({p99}) rounded up to a multiple of {SEQ_LEN_MULTIPLE}, "
        f"at most the model's context ({context})"
    )


def micro_batching(
    batch_size: int,
    facts: ModelFacts,
    seq_len: int,
    lora_r: int,
    gpu_class: GpuClass,
    workload: Workload = SUPERVISED,
) -> tuple[int, int, str]:
    """The largest micro-batch dividing `batch_size` whose peak memory fits the class."""
    on_gpu = gpu_class.name != "cpu"
    budget = gpu_class.memory_gb * MEMORY_HEADROOM
    for micro in sorted((d for d in range(1, batch_size + 1) if batch_size % d == 0), reverse=True):
        peak = peak_memory_gib(facts, micro, seq_len, lora_r, on_gpu, workload)
        if peak <= budget:
            accumulation = batch_size // micro
            return (
                micro,
                accumulation,
                (
                    f"micro-batches of {micro} × {accumulation} accumulation steps: peak ≈ {peak:.1f} GiB "
                    f"of {gpu_class.name}'s {gpu_class.memory_gb:g} GiB"
                ),
            )
    peak = peak_memory_gib(facts, 1, seq_len, lora_r, on_gpu, workload)
    return (
        1,
        batch_size,
        (
            f"even one example needs ≈ {peak:.1f} GiB, more than {gpu_class.name}'s {gpu_class.memory_gb:g} GiB: "
            "choose a larger GPU class or a shorter max_seq_length"
        ),
    )


def resolve(
    requested: dict[str, Any],
    stats: DataStats,
    *,
    facts: ModelFacts,
    context: int,
    base_learning_rate: float | None,
    lora: LoraSettings,
    gpu_class: GpuClass,
    seed: int = 0,
    processes: int = 1,
    method_type: str = "supervised",
    encoder: bool = False,
) -> Hyperparameters:
    """Every setting of a job: the request's value where given, else the rule's, with the reason.

    `batch_size` is the global batch: each of the `processes` (one per device) takes an equal share.
    `method_type` (a registered method, shared.methods) brings the rules that differ; `encoder`: the model is
    a masked-LM encoder (BERT-like), which a method that may train every weight fine-tunes whole when small.
    """
    rules = method(method_type).rules
    reasons: dict[str, str] = {}

    def pick(name: str, rule: tuple[Any, str]) -> Any:
        value = requested.get(name, "auto")
        if value == "auto" or value is None:
            chosen, reasons[name] = rule
            return chosen
        reasons[name] = "set by the request"
        return value

    n = stats.n_train
    n_epochs = int(pick("n_epochs", auto_epochs(n)))
    batch_size = int(pick("batch_size", (rules.batch_size or auto_batch_size)(n)))
    multiplier = float(pick("learning_rate_multiplier", (1.0, "auto: 1.0 × the base learning rate")))
    if rules.full_fine_tuning:
        training = str(pick("method", auto_training_method(encoder, facts.n_params)))
    else:
        training = "lora"
        reasons["method"] = (
            "LoRA: a small adapter over frozen weights (fits where full fine-tuning would not)"
        )
    workload = method(method_type).workload(training)
    base, source = base_learning_rate_of(method_type, training, base_learning_rate)
    reasons["learning_rate"] = f"{base:g} ({source}) × multiplier {multiplier:g}"
    max_seq_length = int(pick("max_seq_length", auto_max_seq_length(stats.train_lengths, context)))
    if batch_size % processes:
        rounded = math.ceil(batch_size / processes) * processes
        reasons["batch_size"] += (
            f"; rounded up from {batch_size} to {rounded}, a multiple of {processes} processes"
        )
        batch_size = rounded
    micro, accumulation, reasons["micro_batch_size"] = micro_batching(
        batch_size // processes, facts, max_seq_length, lora.r, gpu_class, workload
    )
    if processes > 1:
        reasons["micro_batch_size"] += f", on each of {processes} processes"
    if training == "lora":
        targets = ", ".join(lora.target_modules) if lora.target_modules else "every linear layer"
        reasons["lora"] = f"r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout:g} on {targets}: " + (
            "the defaults (alpha = 2 × r, as Together and QLoRA use)"
            if lora == LoraSettings()
            else "set by the request"
        )
    weight_decay_rule = (
        (FULL_FINE_TUNE_WEIGHT_DECAY, f"auto: {FULL_FINE_TUNE_WEIGHT_DECAY:g}, BERT's for full fine-tuning")
        if training == "full"
        else (0.0, "auto: 0; LoRA's dropout and few trained weights already regularize")
    )
    # The method's own settings (e.g. packing, beta, class_weights); the others keep the record's defaults.
    own = (
        rules.settings(pick, Planned(stats.train_lengths, max_seq_length, micro, seed))
        if rules.settings
        else {}
    )
    has_validation = bool(stats.valid_lengths)
    patience_rule = (
        (
            AUTO_EARLY_STOPPING_PATIENCE,
            f"auto: stop after {AUTO_EARLY_STOPPING_PATIENCE} epochs without a lower validation loss",
        )
        if has_validation and n_epochs >= 3
        else (None, "auto: off (needs validation data and at least 3 epochs)")
    )
    return Hyperparameters(
        method=training,
        n_epochs=n_epochs,
        batch_size=batch_size,
        micro_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        processes=processes,
        learning_rate_multiplier=multiplier,
        learning_rate=base * multiplier,
        max_seq_length=max_seq_length,
        warmup_ratio=float(
            pick("warmup_ratio", (AUTO_WARMUP_RATIO, f"auto: {AUTO_WARMUP_RATIO:.0%} of the steps"))
        ),
        weight_decay=float(pick("weight_decay", weight_decay_rule)),
        scheduler=str(pick("scheduler", ("linear", "auto: linear decay to 0 after warmup"))),
        max_grad_norm=float(pick("max_grad_norm", (1.0, "auto: clip gradients at norm 1"))),
        early_stopping_patience=pick("early_stopping_patience", patience_rule),
        early_stopping_min_delta=float(
            pick("early_stopping_min_delta", (0.0, "auto: any decrease of the validation loss counts"))
        ),
        label_smoothing=float(pick("label_smoothing", (0.0, "auto: 0 (targets are not smoothed)"))),
        **own,
        reasons=reasons,
    )
