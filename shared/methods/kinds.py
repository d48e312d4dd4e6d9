"""The data kinds today's methods train on. Methods of one kind share its reader and planner (DPO and ORPO
both read preference pairs); a method on a new kind declares its own `Kind` beside it."""

from __future__ import annotations

from shared.methods.base import Kind

CHAT = Kind(
    name="chat",
    help="chat, prompt/completion, alpaca or sharegpt examples",
    reader="shared.ml.chat_data:read_chat_examples",
    planner="services.evaluator.prepare:plan_chat",
)
PREFERENCE = Kind(
    name="preference",
    help="preference pairs (OpenAI's DPO rows: input, preferred_output, non_preferred_output; or prompt, "
    "chosen, rejected)",
    reader="shared.ml.preference_data:read_preference_examples",
    planner="services.evaluator.prepare:plan_preference",
)
CLASSIFICATION = Kind(
    name="classification",
    help="classification rows (text, label)",
    reader="shared.ml.classification_data:read_classification_examples",
    planner="services.evaluator.prepare:plan_classification",
)
