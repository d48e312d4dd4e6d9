"""Kahneman–Tversky optimisation (KTO, Ethayarajh et al. 2024): a LoRA adapter learns from unpaired
feedback, each prompt with one completion labelled desirable or not, to raise the desirable completions and
lower the undesirable ones against the frozen base (Tunery's method; TRL's `KTOTrainer`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from shared.methods.base import Auto, CommonHyperparameters, Kind, Method, Pick, Planned, Rule, Rules
from shared.planning.estimate import Workload

# Feedback rows upload as chat files (a `messages` row keeps `label` among its other fields), so the kind's
# name is the task such a file gets; its reader checks what KTO needs of each row and its planner resolves
# the class weights from the labels.
FEEDBACK = Kind(
    name="chat",
    help="feedback rows: chat messages ending with the assistant's completion, and a boolean label (true: "
    "desirable, false: undesirable), as LLaMA-Factory's kto_en_demo",
    reader="shared.ml.feedback_data:read_feedback_examples",
    planner="shared.ml.feedback_data:plan_feedback",
)


class KtoHyperparametersIn(CommonHyperparameters):
    """Kahneman–Tversky optimisation (Tunery's method)."""

    beta: Annotated[float, Field(gt=0, le=10)] | Auto | None = Field(
        default=None,
        description="how far the tuned model may move from the base: larger keeps it closer (auto: 0.1)",
    )
    desirable_weight: Annotated[float, Field(gt=0, le=100)] | Auto | None = Field(
        default=None,
        description="the loss weight of desirable completions (auto: balanced with the labels' counts)",
    )
    undesirable_weight: Annotated[float, Field(gt=0, le=100)] | Auto | None = Field(
        default=None,
        description="the loss weight of undesirable completions (auto: balanced with the labels' counts)",
    )


# Beta 0.1 (the paper's and TRL's default), and a tenth of the model's supervised LoRA rate as for DPO: KTO
# refines a model that already answers, from the same kind of reward against the same reference.
KTO_BETA = 0.1
KTO_LEARNING_RATE_FACTOR = 0.1
# z_ref is estimated from the micro-batch's other rows (TRL refuses fewer than 2): 8 rows, TRL's default
# per-device batch, whatever the data's size.
KTO_BATCH_SIZE = 8


def _batch_size(n_examples: int) -> Rule:
    return KTO_BATCH_SIZE, (
        f"auto: {KTO_BATCH_SIZE} (TRL's default), so that each micro-batch holds mismatched prompt/completion "
        "pairs to estimate KTO's reference point from"
    )


def _learning_rate(base: float, source: str) -> tuple[float, str]:
    return base * KTO_LEARNING_RATE_FACTOR, (
        f"{KTO_LEARNING_RATE_FACTOR:g} × {base:g}, {source}: KTO refines a model that already answers, as "
        "DPO does, and overshoots at supervised rates"
    )


def _settings(pick: Pick, planned: Planned) -> dict[str, Any]:
    """Beta, and the class weights as requested; "auto" weights (None here) are chosen by the feedback
    planner, which counts the labels (shared.ml.feedback_data.balanced_weights)."""
    auto_weight = (None, "auto: balanced with the labels' counts")
    return {
        "beta": float(pick("beta", (KTO_BETA, f"auto: {KTO_BETA:g}, the KTO paper's and TRL's default"))),
        "desirable_weight": pick("desirable_weight", auto_weight),
        "undesirable_weight": pick("undesirable_weight", auto_weight),
    }


def _workload(training: str) -> Workload:
    """Each row and its mismatched KL row in the same micro-batch, and the frozen reference (the adapter
    disabled) scoring both."""
    return Workload(sequences_per_example=2, reference_forward=True)


METHOD = Method(
    name="kto",
    summary="Tunery's kto (feedback: completions labelled desirable or not)",
    data_kind=FEEDBACK,
    hyperparameters=KtoHyperparametersIn,
    shown=("beta", "desirable_weight", "undesirable_weight"),
    rules=Rules(batch_size=_batch_size, learning_rate=_learning_rate, settings=_settings),
    workload=_workload,
    result_columns=(
        "step",
        "train_loss",
        "train_accuracy",
        "train_kl",
        "valid_loss",
        "valid_reward_accuracy",
        "valid_kl",
    ),
    # What KTO optimises, defined on any validation set (the ordering figures need both labels among its rows).
    validation_metrics=("loss", "reward_accuracy", "kl"),
    model_card_kind="A LoRA feedback tune (KTO)",
    serves="chat",
    recipe="services.trainer.recipes.kto:train_kto",
    evaluator="services.evaluator.feedback_eval:evaluate",
    api_note="Tunery's method",
)
