"""The rules that turn "auto" hyperparameters into values, each with a one-line reason.

Every suggestion Tunery makes is written here, so a reader can find why a job got its settings.
"""

from __future__ import annotations

import math
from typing import Any

from shared.records import Hyperparameters

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


def resolve(
    requested: dict[str, Any], n_examples: int, base_learning_rate: float | None = None
) -> Hyperparameters:
    """Resolve `n_epochs`, `batch_size` and `learning_rate_multiplier` ("auto" or missing → rule).

    `base_learning_rate` is the model's own base rate from the catalog, when the operator set one.
    """
    reasons: dict[str, str] = {}

    def pick(name: str, rule: tuple[Any, str]) -> Any:
        value = requested.get(name, "auto")
        if value == "auto" or value is None:
            chosen, reasons[name] = rule
            return chosen
        reasons[name] = "set by the request"
        return value

    n_epochs = pick("n_epochs", auto_epochs(n_examples))
    batch_size = pick("batch_size", auto_batch_size(n_examples))
    multiplier = pick("learning_rate_multiplier", (1.0, "auto: 1.0 × the base learning rate"))
    base, source = (
        (base_learning_rate, "the model's base rate in the catalog")
        if base_learning_rate is not None
        else (LORA_BASE_LEARNING_RATE, "the LoRA base rate")
    )
    learning_rate = base * float(multiplier)
    reasons["learning_rate"] = f"{base:g} ({source}) × multiplier {float(multiplier):g}"
    return Hyperparameters(
        n_epochs=int(n_epochs),
        batch_size=int(batch_size),
        learning_rate_multiplier=float(multiplier),
        learning_rate=learning_rate,
        reasons=reasons,
    )
