"""Text classification: an encoder or decoder model with a classification head.

The classic AutoTrain task. Labels come from the training data (`shared.ml.classification_data`); the model is
`AutoModelForSequenceClassification` with that many classes and their names in its config. Two methods:

- "full": every weight trains (the usual choice for encoders of up to ~150M parameters: BERT, MiniLM,
  DeBERTa), in fp32;
- "lora": a LoRA adapter on every linear layer plus the (fresh) classification head, trained and saved
  whole through peft's `modules_to_save` (the choice for decoder LLMs, which the head reads at the last
  non-pad token, so the config gets a pad_token_id).

"auto" picks full for masked-LM encoders up to FULL_FINE_TUNE_MAX_PARAMS and LoRA otherwise. The loss is
cross-entropy per example (optionally class-weighted and label-smoothed), a mean across the accumulation
window and all processes (services.trainer.driver).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft import TaskType, get_peft_model
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
from shared.ml.classification_data import (
    DEFAULT_GROUP_FIELD,
    class_weights,
    classification_head,
    collate_classification,
    iter_classification_batches,
    label_vocabulary,
    load_sequence_classifier,
    pad_token_id,
    resolve_method,
    tokenize_classification,
    write_labels,
)
from shared.ml.classification_metrics import evaluate_classifier, summary
from shared.ml.model_loading import weights_dtype

log = logging.getLogger(__name__)


@dataclass
class ClassificationConfig(TrainConfig):
    train_examples: list[Example]  # kind "classification": text, label (a string), fields
    valid_examples: list[Example] | None
    method: Literal["auto", "full", "lora"] = "auto"  # the LoRA settings apply to "lora" only
    class_weights: Literal["none", "balanced"] = "none"
    group_field: str | None = DEFAULT_GROUP_FIELD  # Example.fields key reported by_group in validation


@dataclass
class ClassificationResult(TrainResult):
    # class id i is labels[i] (also in labels.json and the model config)
    labels: list[str] = field(default_factory=list)
    method: Literal["full", "lora"] = "full"  # what "auto" resolved to


def train_classification(config: ClassificationConfig, hooks: TrainingHooks) -> ClassificationResult:
    """Fine-tune a classifier; save it under output_dir unless stopped with "discard" or "suspend" (which
    saves a checkpoint instead) or run as a max_steps trial:

    - `model/` (method "full": config with id2label, safetensors weights) or `adapter/` (method "lora":
      the adapter and the head);
    - `tokenizer/`, and `labels.json` ({"labels": [...], "id2label": ..., "method", "base_model_type",
      "pad_token_id", "max_seq_length"}).
    """
    if config.class_weights not in ("none", "balanced"):
        raise ValueError(f"class_weights must be 'none' or 'balanced', not {config.class_weights!r}")
    accelerator = setup(config)

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

    # fp32 for full fine-tuning (AdamW on bf16 weights loses small updates); LoRA trains fp32 adapters on
    # frozen bf16 weights where the GPU supports it. The fresh head's weights draw from the seed.
    resolve = partial(
        resolve_method, config.method, config.model_dir, trust_remote_code=config.trust_remote_code
    )
    model = load_sequence_classifier(
        config.model_dir, labels, pad_token_id=pad_id, trust_remote_code=config.trust_remote_code,
        dtype=torch.float32 if resolve(None) == "full" else weights_dtype(accelerator.device),
    )  # fmt: skip
    training = resolve(model)
    if training == "lora":
        model = get_peft_model(model, lora_config(config, TaskType.SEQ_CLS, classification_head(model)))
    weights = class_weights(train, len(labels)) if config.class_weights == "balanced" else None

    def validate(model: torch.nn.Module) -> dict[str, Any]:
        return evaluate_classifier(
            model, iter_classification_batches(valid, config.batch_size, pad_id), labels
        )

    def save(model: torch.nn.Module) -> dict[str, str]:
        out = config.output_dir
        if training == "lora":
            saved, base = save_adapter(model, tokenizer, out), model.get_base_model()
        else:  # config with id2label, safetensors weights
            model.save_pretrained(out / "model", safe_serialization=True)
            tokenizer.save_pretrained(out / "tokenizer")
            saved, base = {"model": str(out / "model"), "tokenizer": str(out / "tokenizer")}, model
        labels_path = write_labels(
            out, labels, method=training, base_model_type=base.config.model_type, pad_token_id=pad_id,
            max_seq_length=config.max_seq_length,
        )  # fmt: skip
        return saved | {"labels": str(labels_path)}

    recipe = Recipe(
        model=model,
        train=train,
        collate=partial(collate_classification, pad_token_id=pad_id),
        loss=partial(
            example_loss,
            weights=None if weights is None else weights.to(accelerator.device),
            label_smoothing=config.label_smoothing,
        ),
        validate=validate if valid else None,
        validation_metrics=method("classification").validation_metrics,
        save=save,
        summary=summary,
        warnings=warnings,
    )
    result = drive(recipe, config, hooks, accelerator)
    return ClassificationResult(**vars(result), labels=labels, method=training)


def example_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    weights: torch.Tensor | None,
    label_smoothing: float,
) -> Loss:
    """Summed cross-entropy of one micro-batch's examples, its summed weights and correct predictions.

    With class weights, each example's loss counts its class's weight, and the mean is over the weights
    (torch's `weight=` mean), so "balanced" changes which examples matter, not the loss's scale.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"].to(logits.device)
    per_example = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    example_weights = torch.ones_like(per_example) if weights is None else weights[labels]
    n_correct = (logits.argmax(dim=-1) == labels).sum()
    return Loss(
        (per_example * example_weights).sum(), example_weights.sum().detach(), n_correct,
        torch.tensor(len(labels), device=logits.device), batch["attention_mask"].sum(),
    )  # fmt: skip
