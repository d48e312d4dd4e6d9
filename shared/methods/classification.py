"""Text classification (Tunery's method): a head on an encoder or a decoder learns each text's label; small
encoders train every weight, larger models a LoRA adapter and the head."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from shared.methods.base import Auto, CommonHyperparameters, Method, Pick, Planned, Rules
from shared.methods.kinds import CLASSIFICATION
from shared.planning.estimate import Workload


class ClassificationHyperparametersIn(CommonHyperparameters):
    """Text classification with a head (Tunery's method)."""

    class_weights: Literal["none", "balanced", "auto"] | None = Field(
        default=None,
        description="balanced: each class's loss weighed by its rarity; none: every example alike",
    )
    label_smoothing: Annotated[float, Field(ge=0, le=0.5)] | Auto | None = Field(
        default=None, description="share of each target's probability spread over the classes, or auto"
    )
    method: Literal["auto", "full", "lora"] | None = Field(
        default=None,
        description="full: every weight trains (small encoders); lora: an adapter and the head (decoders)",
    )


# BERT's fine-tuning batches (Devlin et al. 2019: 16-32), with at least this many steps an epoch.
CLASSIFICATION_BATCH_SIZE = 32
MIN_STEPS_PER_EPOCH = 10


def auto_classification_batch_size(n_examples: int) -> tuple[int, str]:
    size = max(1, min(CLASSIFICATION_BATCH_SIZE, n_examples // MIN_STEPS_PER_EPOCH))
    return size, (
        f"auto: {CLASSIFICATION_BATCH_SIZE} (BERT's fine-tuning batch), at most a tenth of the {n_examples} "
        f"examples so an epoch has at least {MIN_STEPS_PER_EPOCH} steps"
    )


def _settings(pick: Pick, planned: Planned) -> dict[str, Any]:
    return {"class_weights": pick("class_weights", ("none", "auto: none, every example counts alike"))}


def _workload(training: str) -> Workload:
    """Every weight in fp32 when it trains whole; a head scoring a few classes instead of logits over the
    vocabulary."""
    return Workload(full=training == "full", lm_head=False)


METHOD = Method(
    name="classification",
    summary="Tunery's classification (text, label)",
    data_kind=CLASSIFICATION,
    hyperparameters=ClassificationHyperparametersIn,
    shown=("class_weights", "label_smoothing", "method"),
    rules=Rules(batch_size=auto_classification_batch_size, full_fine_tuning=True, settings=_settings),
    workload=_workload,
    result_columns=("step", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "valid_macro_f1"),
    validation_metrics=("loss", "accuracy", "macro_f1"),
    model_card_kind="A text classifier fine-tuned",
    serves="classification",
    recipe="services.trainer.recipes.classification:train_classification",
    evaluator="services.evaluator.classification_eval:evaluate",
    api_note="Tunery's method",
)
