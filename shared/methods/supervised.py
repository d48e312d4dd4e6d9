"""Supervised fine-tuning: a LoRA adapter learns the assistant replies of chat conversations (OpenAI's
`supervised`, the method of a job that names none)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from shared.methods.base import Auto, CommonHyperparameters, Method, Pick, Planned, Rule, Rules
from shared.methods.kinds import CHAT
from shared.planning.estimate import SUPERVISED, Workload, padded_tokens_per_epoch
from shared.planning.packing import packed_padded_tokens


class HyperparametersIn(CommonHyperparameters):
    """Supervised fine-tuning."""

    packing: bool | Auto | None = Field(
        default=None, description="Tunery: pack short examples into full rows (each isolated from the others)"
    )
    train_on_inputs: bool | None = Field(
        default=None, description="Tunery: also train on prompt tokens, not only on assistant replies"
    )
    label_smoothing: Annotated[float, Field(ge=0, le=0.5)] | Auto | None = Field(
        default=None,
        description="Tunery: share of each target's probability spread over the vocabulary, 0-0.5, or auto",
    )


# Packing is chosen when it saves at least this share of the tokens a padded epoch computes.
MIN_PACKING_SAVING = 0.25


def auto_packing(
    lengths: list[int], max_seq_length: int, micro_batch_size: int, seed: int
) -> tuple[bool, str]:
    padded = padded_tokens_per_epoch(lengths, micro_batch_size, max_seq_length, seed)
    packed = packed_padded_tokens(lengths, max_seq_length, micro_batch_size, seed, 1)
    saving = 1 - packed / padded if padded else 0.0
    verdict = "on" if saving >= MIN_PACKING_SAVING else "off"
    return verdict == "on", (
        f"auto: {verdict}; packing would compute {saving:.0%} fewer tokens per epoch than padded batches "
        f"(on from {MIN_PACKING_SAVING:.0%})"
    )


def _settings(pick: Pick, planned: Planned) -> dict[str, Any]:
    """Packing when it saves compute, and the loss on the replies alone (the other methods' batches hold
    whole examples, each scored on its own targets)."""
    packing_rule: Rule = auto_packing(
        planned.train_lengths, planned.max_seq_length, planned.micro_batch_size, planned.seed
    )
    return {
        "packing": bool(pick("packing", packing_rule)),
        "train_on_inputs": bool(pick("train_on_inputs", (False, "auto: loss on assistant replies only"))),
    }


def _workload(training: str) -> Workload:
    return SUPERVISED


METHOD = Method(
    name="supervised",
    summary="supervised (chat data)",
    data_kind=CHAT,
    hyperparameters=HyperparametersIn,
    shown=(),
    rules=Rules(settings=_settings),
    workload=_workload,
    # OpenAI's columns, which its checkpoint metrics name.
    result_columns=("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"),
    validation_metrics=("loss", "mean_token_accuracy"),
    model_card_kind="A LoRA fine-tune",
    serves="chat",
    recipe="services.trainer.recipes.sft:train_sft",
    evaluator="services.evaluator.task:evaluate",
    learning_rate_sweep=True,
)
