"""Kahneman–Tversky optimisation (KTO) of a causal LM with LoRA on unpaired feedback.

Each example is a prompt with one completion labelled desirable or undesirable (`shared.ml.feedback_data`).
The policy is the base model with a LoRA adapter; the reference is the same model with the adapter disabled,
as in the DPO recipe. The loss is TRL's sigmoid KTO (`feedback_data.kto_loss`): each completion's reward is
β × (log π − log π_ref), measured against a reference point z_ref estimated from the micro-batch's
mismatched prompt/completion pairs (each prompt with the previous row's completion), averaged over the
processes, detached and clamped at 0; a mean per example across the accumulation window and all processes
(services.trainer.driver). At step 0 (LoRA's B matrices start at zero) every reward and z_ref are 0, so each
example costs half its class weight.

Each step reports the KTO loss as train_loss, the reward accuracy (the share of completions whose reward is
> 0 when desirable and < 0 when not) as train_accuracy and z_ref as train_kl; each epoch ends with
`evaluate_feedback` on the validation rows, and early stopping reads its KTO loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import extract_model_from_parallel

from services.trainer.causal_lm import chat_data, lora_causal_lm
from services.trainer.driver import (
    Loss,
    Recipe,
    TrainConfig,
    TrainingHooks,
    TrainResult,
    drive,
    save_adapter,
    setup,
)
from shared.data.formats import Example
from shared.methods import method
from shared.ml.feedback_data import (
    DEFAULT_GROUP_FIELD,
    collate_feedback,
    evaluate_feedback,
    iter_feedback_batches,
    kl_estimate,
    kl_rows,
    kto_loss,
    summary,
    tokenize_feedback,
)
from shared.ml.preference_metrics import pair_logps


@dataclass
class KTOConfig(TrainConfig):
    train_examples: list[Example]  # kind "feedback": chat rows ending with the completion, `label` a boolean
    valid_examples: list[Example] | None
    # batch_size: rows per micro-batch (at least 2: z_ref comes from the other rows); max_seq_length: per row.
    beta: float = 0.1  # how far from the reference the policy may move: larger keeps it closer
    desirable_weight: float = 1.0  # the loss weight of desirable completions
    undesirable_weight: float = 1.0  # of undesirable ones
    group_field: str | None = DEFAULT_GROUP_FIELD  # Example.fields key reported by_group in validation


def train_kto(config: KTOConfig, hooks: TrainingHooks) -> TrainResult:
    """Train a LoRA adapter on feedback rows; save `adapter/` and `tokenizer/` under output_dir unless
    stopped without "save" or run as a max_steps trial."""
    if config.batch_size < 2:
        raise ValueError("KTO needs at least 2 rows per micro-batch: z_ref is estimated from the other rows")
    accelerator = setup(config)

    # Data checks before loading the weights: the stop token, then every row.
    data = chat_data(config, tokenize_feedback, group_field=config.group_field)
    model = lora_causal_lm(config, accelerator)
    weights = {"desirable_weight": config.desirable_weight, "undesirable_weight": config.undesirable_weight}

    def validate(model: torch.nn.Module) -> dict[str, Any]:
        batches = iter_feedback_batches(data.valid, config.batch_size, data.pad_id, config.max_seq_length)
        return evaluate_feedback(model, batches, config.beta, **weights)

    recipe = Recipe(
        model=model,
        train=data.train,
        collate=partial(collate_feedback, pad_token_id=data.pad_id, max_length=config.max_seq_length),
        loss=partial(feedback_loss, beta=config.beta, **weights),
        validate=validate if data.valid else None,
        validation_metrics=method("kto").validation_metrics,
        save=partial(save_adapter, tokenizer=data.tokenizer, output_dir=config.output_dir),
        summary=summary,
        warnings=data.warnings,
    )
    return drive(recipe, config, hooks, accelerator)


def feedback_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> Loss:
    """Summed KTO loss of one micro-batch of rows, their reward accuracy and z_ref."""
    # The reference: the same weights with the adapter disabled, no graph kept. Through the prepared
    # model, so a sharded one (FSDP) gathers its weights as for the policy.
    with torch.no_grad():
        policy_kl, _ = pair_logps(model, kl_rows(batch))  # z_ref carries no gradient (TRL: under no_grad)
        with extract_model_from_parallel(model).disable_adapter():
            reference, _ = pair_logps(model, batch)
            reference_kl, _ = pair_logps(model, kl_rows(batch))
    policy, _ = pair_logps(model, batch)
    kl = kl_estimate(policy_kl, reference_kl)
    if dist.is_available() and dist.is_initialized():  # TRL averages the processes' estimates
        dist.all_reduce(kl)
        kl = kl / dist.get_world_size()
    desirable = batch["desirable"].to(policy.device)
    losses, rewards = kto_loss(policy, reference, desirable, kl, beta, desirable_weight, undesirable_weight)
    right = torch.where(desirable, rewards > 0, rewards < 0)
    n_rows = torch.tensor(len(losses), device=losses.device)
    tokens = batch["attention_mask"].sum() + batch["kl_attention_mask"].sum()
    return Loss(
        losses.sum(), n_rows, right.sum(), n_rows, tokens, extras={"train_kl": kl.clamp(min=0) * n_rows}
    )
