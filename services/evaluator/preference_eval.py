"""The evaluation of a job on preference pairs (DPO, ORPO): the base model and the tuned adapter on the same
held-out pairs.

Its figures (`shared.ml.preference_metrics`, and `shared.ml.lm_metrics`):

- each model's own ranking, comparable between the two: `preference_accuracy` (the share of pairs whose
  chosen reply gets the higher mean log-probability per token) and `logp_margin`;
- for a method trained against a reference (DPO: its workload has a reference forward), what it optimises,
  measured against the base (the reference the adapter was trained from): the DPO `loss`,
  `reward_accuracy` (the share of pairs whose chosen reply gained more log-probability than the rejected
  one) and `reward_margin`. The base is its own reference: its loss is log 2, its reward margin 0, and its
  reward accuracy has no meaning (chance is 0.5);
- for a method without a reference (ORPO, supervised fine-tuning with a penalty on the rejected reply), its
  supervised part: each model's `loss` (per token), perplexity and token accuracy on the chosen replies.

The verdict follows what the method optimises. DPO: the held-out DPO loss against the base's log 2; below
it, the tuned model prefers the chosen replies of pairs it never saw more than the base did. A method
without a reference (ORPO) has no implicit reward, and the base's figures are of the same kind as the tuned
model's: the verdict follows the preference accuracy, base against tuned (the share of pairs whose chosen
reply has the higher odds, which ORPO's odds-ratio term raises; TRL's rewards/accuracies), and on a tie the
log-prob margin.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from peft import PeftModel
from redis import Redis
from transformers import AutoTokenizer

from services.evaluator.cancellation import CancelWatch, watching
from shared.methods import method
from shared.ml.chat_data import iter_batches
from shared.ml.group_metrics import largest_gap
from shared.ml.lm_metrics import evaluate_causal_lm
from shared.ml.materialize import materialize
from shared.ml.model_loading import default_device, generation_eos_ids, load_causal_lm, weights_dtype
from shared.ml.preference_data import DEFAULT_GROUP_FIELD, iter_preference_batches, tokenize_preferences
from shared.ml.preference_metrics import evaluate_preferences
from shared.ml.task_data import read_validation_rows
from shared.planning.catalog import load_catalog
from shared.platform.failures import JobFailure
from shared.platform.records import JobRecord
from shared.platform.settings import Settings
from shared.platform.storage import Storage

EVAL_BATCH_SIZE = 8  # pairs: 16 sequences a forward pass
LOSS_TOLERANCE = 1e-3  # a DPO loss this close to log 2 is "unchanged"
MARGIN_TOLERANCE = 1e-3  # nats per token: on equal preference accuracies, a smaller margin change is none
LOG_2 = math.log(2)
RANKING = ("preference_accuracy", "logp_margin")  # both models
CHOSEN_FIT = ("loss", "perplexity", "mean_token_accuracy")  # both models on the chosen replies (no reference)
REWARD = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")  # against the base


def evaluate(
    settings: Settings,
    redis: Redis,
    storage: Storage,
    record: JobRecord,
    *,
    group_field: str | None = DEFAULT_GROUP_FIELD,
    watch: CancelWatch | None = None,
    **_generation: Any,
) -> dict[str, Any]:
    """Score the base model and the job's adapter on its held-out pairs; the report (`build_report`).
    `group_field`: the row field whose values are reported as groups (None: no groups).
    `watch`: stops the scoring (EvaluationCancelled) once the job has moved on. The report's `task` is the
    job's method; the chat evaluator's generation options do not apply."""
    entry = load_catalog(settings).get(record.model)
    if entry is None:
        raise JobFailure("model_not_found", f"model {record.model!r} is no longer in the catalog", "model")
    trust = settings.allow_trust_remote_code
    device = default_device()
    hp = record.hyperparameters
    # Trained against the base (the adapter disabled): DPO's implicit rewards; else each model's ranking.
    against_base = method(record.method_type).workload(hp.method).reference_forward
    with tempfile.TemporaryDirectory(prefix=f"tunery-eval-{record.id}-") as tmp:
        workdir = Path(tmp)
        base_dir = materialize(entry, settings)
        storage.download_prefix(record.artifacts["tokenizer"], workdir / "tokenizer")
        storage.download_prefix(record.artifacts["adapter"], workdir / "adapter")
        examples, source = read_validation_rows(redis, storage, record, workdir)

        tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer", trust_remote_code=trust)
        eos_ids = generation_eos_ids(base_dir, tokenizer, trust_remote_code=trust)
        pairs, _ = tokenize_preferences(
            tokenizer, examples, hp.max_seq_length, eos_token_ids=eos_ids, dataset="validation",
            group_field=group_field,
        )  # fmt: skip
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model = load_causal_lm(base_dir, trust_remote_code=trust, dtype=weights_dtype(device)).to(device)

        def batches() -> Any:
            return iter_preference_batches(pairs, EVAL_BATCH_SIZE, pad_id)

        def chosen_fit(model: Any) -> dict[str, float]:
            """How well `model` predicts the chosen replies: the loss per token an SFT evaluation reports."""
            chosen = iter_batches([pair.chosen for pair in pairs], 2 * EVAL_BATCH_SIZE, pad_id)
            return evaluate_causal_lm(model, chosen)

        with watching(watch, model):
            base = evaluate_preferences(model, batches(), hp.beta, reference=None)
            base_fit = None if against_base else chosen_fit(model)
            # The adapter goes into `model` in place; with it disabled, the same weights are the reference.
            tuned_model = PeftModel.from_pretrained(model, workdir / "adapter")
            reference = "adapter" if against_base else None
            tuned = evaluate_preferences(tuned_model, batches(), hp.beta, reference=reference)
            tuned_fit = None if against_base else chosen_fit(tuned_model)
    if base_fit is None or tuned_fit is None:
        report = build_report(source, base, tuned, beta=hp.beta, group_field=group_field)
    else:
        report = build_ranking_report(source, base, tuned, base_fit, tuned_fit, group_field=group_field)
    return {"task": record.method_type, **report}


def build_report(
    source: str,
    base: dict[str, Any],
    tuned: dict[str, Any],
    *,
    beta: float,
    group_field: str | None = DEFAULT_GROUP_FIELD,
) -> dict[str, Any]:
    """The evaluation report from `evaluate_preferences` of the base alone and of the tuned adapter
    against it, on the same pairs.

    {validation_source, n_examples, beta, base and fine_tuned {preference_accuracy, logp_margin, loss,
    reward_accuracy, reward_margin, chosen_reward, rejected_reward} (the base's reward figures are its own
    by definition: loss log 2, rewards 0, reward accuracy None), verdict (improved, unchanged or regressed,
    by the DPO loss against log 2), loss_change, preference_accuracy_change, verdict_summary, by_group (None
    unless some pair has a group)}.
    """
    change = tuned["loss"] - LOG_2
    verdict = (
        "improved" if change < -LOSS_TOLERANCE else "regressed" if change > LOSS_TOLERANCE else "unchanged"
    )
    report: dict[str, Any] = {
        "validation_source": source,
        "n_examples": tuned["n_pairs"],
        "beta": beta,
        "base": _figures(base, as_reference=True),
        "fine_tuned": _figures(tuned),
        "verdict": verdict,
        "loss_change": change,
        "preference_accuracy_change": tuned["preference_accuracy"] - base["preference_accuracy"],
    }
    report["verdict_summary"] = (
        f"DPO loss {LOG_2:.4f} → {tuned['loss']:.4f} ({change:+.4f}); reward accuracy "
        f"{tuned['reward_accuracy']:.2f} (chance 0.5), margin {tuned['reward_margin']:+.4f}; preference accuracy "
        f"{base['preference_accuracy']:.2f} → {tuned['preference_accuracy']:.2f} "
        f"({report['preference_accuracy_change']:+.2f}) on {report['n_examples']} pairs"
    )
    report["by_group"] = _by_group(base, tuned, group_field)
    return report


def build_ranking_report(
    source: str,
    base: dict[str, Any],
    tuned: dict[str, Any],
    base_fit: dict[str, float],
    tuned_fit: dict[str, float],
    *,
    group_field: str | None = DEFAULT_GROUP_FIELD,
) -> dict[str, Any]:
    """The evaluation report of a method trained without a reference (ORPO), from `evaluate_preferences` of
    the base and of the tuned adapter, each alone, and `evaluate_causal_lm` of each on the chosen replies
    (the supervised part of such a method), on the same pairs.

    {validation_source, n_examples, base and fine_tuned {preference_accuracy, logp_margin, and the chosen
    replies' loss, perplexity and mean_token_accuracy}, verdict (improved, unchanged or regressed: by the
    preference accuracy against the base's, on a tie by the log-prob margin), preference_accuracy_change,
    logp_margin_change, chosen_loss_change, verdict_summary, by_group (None unless some pair has a group:
    the ranking per group)}.
    """
    won = tuned["preference_accuracy"] - base["preference_accuracy"]
    change = tuned["logp_margin"] - base["logp_margin"]
    if won == 0:
        won = change if abs(change) > MARGIN_TOLERANCE else 0
    verdict = "improved" if won > 0 else "regressed" if won < 0 else "unchanged"
    report: dict[str, Any] = {
        "validation_source": source,
        "n_examples": tuned["n_pairs"],
        "base": _figures(base, rewards=False) | {key: base_fit[key] for key in CHOSEN_FIT},
        "fine_tuned": _figures(tuned, rewards=False) | {key: tuned_fit[key] for key in CHOSEN_FIT},
        "verdict": verdict,
        "preference_accuracy_change": tuned["preference_accuracy"] - base["preference_accuracy"],
        "logp_margin_change": change,
        "chosen_loss_change": tuned_fit["loss"] - base_fit["loss"],
    }
    report["verdict_summary"] = (
        f"preference accuracy {base['preference_accuracy']:.2f} → {tuned['preference_accuracy']:.2f} "
        f"({report['preference_accuracy_change']:+.2f}); log-prob margin (chosen − rejected, per token) "
        f"{base['logp_margin']:+.4f} → {tuned['logp_margin']:+.4f} ({change:+.4f}); the chosen replies' loss "
        f"{base_fit['loss']:.4f} → {tuned_fit['loss']:.4f} per token; on {report['n_examples']} pairs"
    )
    report["by_group"] = _by_group(base, tuned, group_field, rewards=False)
    return report


def _figures(scores: dict[str, Any], as_reference: bool = False, rewards: bool = True) -> dict[str, Any]:
    """A model's figures: its ranking, and with `rewards` DPO's against the base (`as_reference`: the base,
    whose reward figures hold by definition)."""
    ranking = {key: scores[key] for key in RANKING}
    if not rewards:
        return ranking
    if as_reference:
        reference = {"loss": LOG_2, "reward_accuracy": None, "reward_margin": 0.0}
        return ranking | reference | {"chosen_reward": 0.0, "rejected_reward": 0.0}
    return ranking | {key: scores[key] for key in REWARD}


def _by_group(
    base: dict[str, Any], tuned: dict[str, Any], group_field: str | None, rewards: bool = True
) -> dict[str, Any] | None:
    """{field, n_without_group, groups {value: {n_examples, base, fine_tuned}}, gaps {base: {preference_accuracy},
    fine_tuned: {preference_accuracy, and with `rewards` reward_accuracy}: {gap, best_group, worst_group}},
    gap_change {preference_accuracy: fine-tuned gap minus base gap, > 0 when tuning widened it}}."""
    if base["by_group"] is None:
        return None
    per_group = {
        group: {
            "n_examples": scores["n_pairs"],
            "base": _figures(scores, as_reference=True, rewards=rewards),
            "fine_tuned": _figures(tuned["by_group"]["groups"][group], rewards=rewards),
        }
        for group, scores in base["by_group"]["groups"].items()
    }

    def gap(name: str, metric: str) -> dict[str, Any] | None:
        return largest_gap({group: values[name] for group, values in per_group.items()}, metric)

    tuned_metrics = ("preference_accuracy", "reward_accuracy") if rewards else ("preference_accuracy",)
    gaps = {
        "base": {"preference_accuracy": gap("base", "preference_accuracy")},
        "fine_tuned": {metric: gap("fine_tuned", metric) for metric in tuned_metrics},
    }
    return {
        "field": group_field,
        "n_without_group": base["by_group"]["n_without_group"],
        "groups": per_group,
        "gaps": gaps,
        "gap_change": {
            "preference_accuracy": gaps["fine_tuned"]["preference_accuracy"]["gap"]
            - gaps["base"]["preference_accuracy"]["gap"]
        },
    }
