"""Direct preference optimisation (DPO) of a causal LM with LoRA on preference pairs.

Each example is a prompt with a chosen and a rejected reply (`shared.ml.preference_data`). The policy is the
base model with a LoRA adapter; the reference is the same model with the adapter disabled, so there is no
second copy of the weights in memory, and at step 0 (LoRA's B matrices start at zero) policy and reference
agree and the loss is log 2. The loss is the sigmoid DPO loss on summed reply log-probabilities
(`shared.ml.preference_metrics.dpo_loss`, with conservative-DPO label smoothing), a mean per pair across the
accumulation window and all processes (services.trainer.driver).

Each step reports the DPO loss as train_loss, the reward accuracy (the share of pairs whose chosen reply
has the higher implicit reward) as train_accuracy and the mean reward margin as train_reward_margin; each
epoch ends with `evaluate_preferences` on the validation pairs, and early stopping reads its DPO loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
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
from shared.ml.preference_data import (
    DEFAULT_GROUP_FIELD,
    collate_pairs,
    iter_preference_batches,
    tokenize_preferences,
)
from shared.ml.preference_metrics import dpo_loss, evaluate_preferences, pair_logps, summary


@dataclass
class DPOConfig(TrainConfig):
    train_examples: list[Example]  # kind "preference": prompt messages, chosen, rejected
    valid_examples: list[Example] | None
    # batch_size: pairs per micro-batch (each forward pass holds twice as many sequences);
    # max_seq_length: per side (prompt + one reply); label_smoothing: conservative DPO's assumed share of
    # wrongly labelled pairs.
    beta: float = 0.1  # how far from the reference the policy may move: larger keeps it closer
    group_field: str | None = DEFAULT_GROUP_FIELD  # Example.fields key reported by_group in validation


def train_dpo(config: DPOConfig, hooks: TrainingHooks) -> TrainResult:
    """Train a LoRA adapter on preference pairs; save `adapter/` and `tokenizer/` under output_dir unless
    stopped without "save" or run as a max_steps trial."""
    if not 0 <= config.label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), not {config.label_smoothing}")
    accelerator = setup(config)

    # Data checks before loading the weights: the stop token, then every pair.
    data = chat_data(config, tokenize_preferences, group_field=config.group_field)
    model = lora_causal_lm(config, accelerator)

    def validate(model: torch.nn.Module) -> dict[str, Any]:
        return evaluate_preferences(
            model, iter_preference_batches(data.valid, config.batch_size, data.pad_id), config.beta
        )

    recipe = Recipe(
        model=model,
        train=data.train,
        collate=partial(collate_pairs, pad_token_id=data.pad_id),
        loss=partial(pair_loss, beta=config.beta, label_smoothing=config.label_smoothing),
        validate=validate if data.valid else None,
        validation_metrics=method("dpo").validation_metrics,
        save=partial(save_adapter, tokenizer=data.tokenizer, output_dir=config.output_dir),
        summary=summary,
        warnings=data.warnings,
    )
    return drive(recipe, config, hooks, accelerator)


def pair_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], beta: float, label_smoothing: float
) -> Loss:
    """Summed DPO loss of one micro-batch of pairs, their reward accuracy and summed reward margins."""
    # The reference: the same weights with the adapter disabled, no graph kept. Through the prepared
    # model, so a sharded one (FSDP) gathers its weights as for the policy.
    with torch.no_grad(), extract_model_from_parallel(model).disable_adapter():
        reference, _ = pair_logps(model, batch)
    policy, _ = pair_logps(model, batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        *policy.chunk(2), *reference.chunk(2), beta, label_smoothing
    )
    margins = chosen_rewards - rejected_rewards
    n_pairs = torch.tensor(len(losses), device=losses.device)
    return Loss(
        losses.sum(), n_pairs, (margins > 0).sum(), n_pairs, batch["attention_mask"].sum(),
        extras={"train_reward_margin": margins.sum()},
    )  # fmt: skip
