"""Supervised LoRA fine-tuning of a causal LM on chat examples.

The loss is cross-entropy per trainable token (the assistant replies, or every token with
`train_on_inputs`) across the whole accumulation window and all processes (services.trainer.driver).

With `packing`, each micro-batch is `batch_size` rows of up to `max_seq_length` tokens, each row holding
several whole examples that cannot attend to each other (shared/ml/packing.py); the examples are shuffled
and packed again every epoch. With `token_cache`, tokenized datasets are kept in storage
(shared/ml/token_cache.py), so another run on the same data (a retry, a sweep trial) does not tokenize again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from peft import get_peft_model
from transformers import AutoTokenizer

from services.trainer.driver import (
    Loss,
    Recipe,
    TrainConfig,
    TrainingHooks,
    TrainResult,
    drive,
    lora_config,
    save_adapter,
    setup,
)
from shared.data.formats import Example
from shared.methods import method
from shared.ml import token_cache
from shared.ml.chat_data import Messages, TokenizedExample, check_eos, collate, iter_batches, tokenize_dataset
from shared.ml.lm_loss import label_token_stats, supports_kept_logits
from shared.ml.lm_metrics import evaluate_causal_lm
from shared.ml.model_loading import generation_eos_ids, load_causal_lm, weights_dtype
from shared.ml.packing import PackedEpochs, collate_packed, packing_mode
from shared.ml.token_cache import PREFIX as TOKEN_CACHE_PREFIX
from shared.planning.packing import PackingStats
from shared.platform.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class SFTConfig(TrainConfig):
    train_examples: list[Example]  # kind "chat": the conversations, and where each is in its file
    valid_examples: list[Example] | None
    # Train on every token (prompts too), not only the assistant replies; validation stays on the replies.
    train_on_inputs: bool = False
    # Pack examples into rows of max_seq_length tokens (batch_size rows per micro-batch); falls back to
    # padded batches, with a warning, when the model's attention implementation cannot isolate examples.
    packing: bool = False
    token_cache: Storage | None = None  # keep tokenized datasets here and reuse them (None: no cache)
    token_cache_prefix: str = TOKEN_CACHE_PREFIX  # where in token_cache, e.g. under the tenant's prefix


@dataclass
class SFTResult(TrainResult):
    packing: PackingStats | None = None  # rows per epoch and fill when training was packed, else None


def train_sft(config: SFTConfig, hooks: TrainingHooks) -> SFTResult:
    """Train a LoRA adapter; save `adapter/` and `tokenizer/` under output_dir unless stopped early."""
    accelerator = setup(config)

    # Data checks before loading the weights (minutes for a large model): the stop token, then that
    # every example has something to learn (examples truncation leaves nothing are skipped, as the
    # estimate said). Validation is always on the replies alone, as the evaluator measures it.
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir, trust_remote_code=config.trust_remote_code)
    eos_ids = generation_eos_ids(config.model_dir, tokenizer, trust_remote_code=config.trust_remote_code)
    warnings = check_eos(tokenizer, eos_ids)

    def tokenize(
        examples: list[Example], dataset: str, train_on_inputs: bool
    ) -> tuple[list[TokenizedExample], list[str]]:
        conversations: list[Messages] = [e.messages or [] for e in examples]
        options: dict[str, Any] = dict(
            eos_token_ids=eos_ids, dataset=dataset, train_on_inputs=train_on_inputs,
            sources=[e.source for e in examples],
        )  # fmt: skip
        if config.token_cache is None or not conversations:
            return tokenize_dataset(tokenizer, conversations, config.max_seq_length, **options)
        return token_cache.tokenize_cached(
            config.token_cache, config.token_cache_prefix, tokenizer, conversations, config.max_seq_length,
            **options,
        )  # fmt: skip

    train, train_warnings = tokenize(config.train_examples, "training", config.train_on_inputs)
    valid, valid_warnings = tokenize(config.valid_examples or [], "validation", False)
    warnings += train_warnings + valid_warnings
    for warning in warnings:
        log.warning(warning)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    model = load_causal_lm(
        config.model_dir, trust_remote_code=config.trust_remote_code, dtype=weights_dtype(accelerator.device)
    )
    weights = next(model.parameters()).dtype  # the float mask of eager attention takes the weights' dtype
    attention = model.config._attn_implementation
    mode = packing_mode(attention) if config.packing else None
    if config.packing and mode is None:
        warnings.append(
            f"packing is not supported with the {attention!r} attention implementation (it cannot keep "
            "packed examples from attending to each other); training on padded batches instead"
        )
        log.warning(warnings[-1])
    model = get_peft_model(model, lora_config(config))

    packed = None
    if mode is None:
        dataset, batch = train, partial(collate, pad_token_id=pad_id)
    else:
        packed = PackedEpochs(train, config.max_seq_length, config.seed)
        log.info(
            "packing %d examples into %d rows of %d tokens (%.1f%% full, %s)", len(train), packed.stats.rows,
            config.max_seq_length, 100 * packed.stats.fill_ratio, attention,
        )  # fmt: skip
        dataset, batch = packed, partial(collate_packed, pad_token_id=pad_id, mode=mode, dtype=weights)

    def validate(model: torch.nn.Module) -> dict[str, Any]:
        return evaluate_causal_lm(model, iter_batches(valid, config.batch_size, pad_id))

    recipe = Recipe(
        model=model,
        train=dataset,
        collate=batch,
        loss=partial(sft_loss, label_smoothing=config.label_smoothing, kept=supports_kept_logits(model)),
        validate=validate if valid else None,
        validation_metrics=method("supervised").validation_metrics,
        save=partial(save_adapter, tokenizer=tokenizer, output_dir=config.output_dir),
        shuffle=packed is None,
        start_epoch=packed.repack if packed is not None else None,
        warnings=warnings,
    )
    result = drive(recipe, config, hooks, accelerator)
    return SFTResult(**vars(result), packing=packed.stats if packed is not None else None)


def sft_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    label_smoothing: float = 0.0,
    *,
    kept: bool = False,
) -> Loss:
    """Summed cross-entropy of the trainable tokens (labels not -100) of one micro-batch; with `kept`
    (`lm_loss.supports_kept_logits`), logits are computed only where a trained label is predicted."""
    # Packed batches add position_ids (reset per example) and a 4-D mask, or no mask at all.
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    stats = label_token_stats(model, inputs, batch["labels"], label_smoothing, kept=kept)
    real = batch["token_mask"] if "token_mask" in batch else batch["attention_mask"]
    return Loss(stats.loss_sum, stats.n_tokens, stats.n_correct, stats.n_tokens, real.sum())
