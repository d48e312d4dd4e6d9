"""Odds ratio preference optimisation (ORPO, Hong et al. 2024): a LoRA adapter learns each pair's chosen reply
and, by a penalty on the odds of the rejected one, to prefer it; one stage from the base model, no reference
model (Tunery's method on OpenAI's DPO data)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from shared.methods.base import Auto, CommonHyperparameters, Method, Pick, Planned, Rules
from shared.methods.kinds import PREFERENCE
from shared.planning.estimate import Workload


class OrpoHyperparametersIn(CommonHyperparameters):
    """Odds ratio preference optimisation (Tunery's method)."""

    beta: Annotated[float, Field(gt=0, le=10)] | Auto | None = Field(
        default=None,
        description="λ, the weight of the odds-ratio penalty on the rejected reply against the chosen "
        "reply's likelihood (TRL's beta; auto: 0.1)",
    )


# λ 0.1: the paper's and TRL's default. No learning-rate rule: ORPO is supervised fine-tuning with a penalty,
# from the base model in one stage, so it trains at the supervised LoRA rate (the ORPO authors train their
# ORPO and SFT models at the same rate), where DPO, which refines an already tuned model, takes a tenth.
ORPO_BETA = 0.1


def _settings(pick: Pick, planned: Planned) -> dict[str, Any]:
    return {"beta": float(pick("beta", (ORPO_BETA, f"auto: {ORPO_BETA:g}, the ORPO paper's and TRL's λ")))}


def _workload(training: str) -> Workload:
    """The prompt with each reply in the same micro-batch; no reference model scores them."""
    return Workload(sequences_per_example=2)


# The loss and its two terms (the chosen replies' NLL, and TRL's log_odds_ratio: the mean log σ of the
# log-odds ratio, which the loss weighs by −beta), and the share of pairs whose chosen reply has the higher odds.
RESULT_COLUMNS = (
    "step", "train_loss", "train_accuracy", "train_nll_loss", "train_log_odds_ratio", "valid_loss",
    "valid_nll_loss", "valid_log_odds_ratio", "valid_preference_accuracy",
)  # fmt: skip

METHOD = Method(
    name="orpo",
    summary="Tunery's orpo (preference pairs, no reference model)",
    data_kind=PREFERENCE,
    hyperparameters=OrpoHyperparametersIn,
    shown=("beta",),
    rules=Rules(settings=_settings),
    workload=_workload,
    result_columns=RESULT_COLUMNS,
    validation_metrics=("loss", "nll_loss", "log_odds_ratio", "preference_accuracy"),
    model_card_kind="A LoRA preference tune (ORPO)",
    serves="chat",
    recipe="services.trainer.recipes.orpo:train_orpo",
    evaluator="services.evaluator.preference_eval:evaluate",
    api_note="Tunery's method",
)
