"""Direct preference optimisation: a LoRA adapter learns to prefer each pair's chosen reply over its
rejected one, measured against the frozen base (OpenAI's `dpo`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from shared.methods.base import Auto, CommonHyperparameters, Method, Pick, Planned, Rules
from shared.methods.kinds import PREFERENCE
from shared.planning.estimate import Workload


class DpoHyperparametersIn(CommonHyperparameters):
    """Direct preference optimisation (OpenAI's DPO hyperparameters, and Tunery's extras)."""

    beta: Annotated[float, Field(gt=0, le=10)] | Auto | None = Field(
        default=None,
        description="how far the tuned model may move from the base: larger keeps it closer (auto: 0.1)",
    )  # fmt: skip
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] | Auto | None = Field(
        default=None,
        description="Tunery: conservative DPO, the share of pairs assumed to be labelled the wrong way round",
    )  # fmt: skip


# Beta 0.1 (the DPO paper's and TRL's default), and a tenth of the model's supervised LoRA rate: DPO refines a
# model that already answers well, and overshoots at supervised rates (the LoRA rate 2e-4 gives 2e-5, inside
# the 5e-6..5e-5 commonly used for LoRA DPO).
DPO_BETA = 0.1
DPO_LEARNING_RATE_FACTOR = 0.1


def _learning_rate(base: float, source: str) -> tuple[float, str]:
    return base * DPO_LEARNING_RATE_FACTOR, (
        f"{DPO_LEARNING_RATE_FACTOR:g} × {base:g}, {source}: DPO refines a model that already answers, "
        "and overshoots at supervised rates"
    )


def _settings(pick: Pick, planned: Planned) -> dict[str, Any]:
    return {"beta": float(pick("beta", (DPO_BETA, f"auto: {DPO_BETA:g}, the DPO paper's and TRL's default")))}


def _workload(training: str) -> Workload:
    """The prompt with each reply in the same micro-batch, and the frozen reference (the adapter disabled)
    scoring every token too."""
    return Workload(sequences_per_example=2, reference_forward=True)


RESULT_COLUMNS = (
    "step", "train_loss", "train_accuracy", "train_reward_margin", "valid_loss", "valid_reward_accuracy",
    "valid_reward_margin", "valid_preference_accuracy",
)  # fmt: skip

METHOD = Method(
    name="dpo",
    summary="dpo (preference pairs)",
    data_kind=PREFERENCE,
    hyperparameters=DpoHyperparametersIn,
    shown=("beta",),
    rules=Rules(learning_rate=_learning_rate, settings=_settings),
    workload=_workload,
    result_columns=RESULT_COLUMNS,
    validation_metrics=("loss", "reward_accuracy", "reward_margin", "preference_accuracy"),
    model_card_kind="A LoRA preference tune (DPO)",
    serves="chat",
    recipe="services.trainer.recipes.dpo:train_dpo",
    evaluator="services.evaluator.preference_eval:evaluate",
)
