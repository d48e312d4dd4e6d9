"""The evaluation of a KTO job: the base model and the tuned adapter on the same held-out feedback rows.

Two families of figures (`shared.ml.feedback_data.evaluate_feedback`):

- each model's own separation of desirable from undesirable completions, comparable between the two, from
  the mean log-probability per token of each completion: `desirable_logp`, `undesirable_logp`, their
  difference `logp_margin`, and `preference_accuracy`, the share of desirable–undesirable row pairs the
  model orders right (the AUC; 0.5 is chance);
- what KTO optimises, measured against the base (the reference the adapter was trained from): the KTO
  `loss`, `reward_accuracy` (the share of completions whose log-probability rose when desirable and fell
  when not), `desirable_reward` and `undesirable_reward`, and `kl` (the reference point z_ref). The base is
  its own reference: every reward and z_ref are 0, so its loss is half the mean class weight and its
  reward accuracy has no meaning.

Both models are scored in one pass: the tuned adapter, and the same weights with it disabled (the base).
The verdict follows the held-out KTO loss against the base's: below it, the tuned model moved rows it never
saw the way their labels ask, more than the base point does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from peft import PeftModel
from redis import Redis
from transformers import AutoTokenizer

from services.evaluator.cancellation import CancelWatch, watching
from shared.ml.feedback_data import (
    DEFAULT_GROUP_FIELD,
    evaluate_feedback,
    iter_feedback_batches,
    tokenize_feedback,
)
from shared.ml.group_metrics import largest_gap
from shared.ml.materialize import materialize
from shared.ml.model_loading import default_device, generation_eos_ids, load_causal_lm, weights_dtype
from shared.ml.task_data import read_validation_rows
from shared.planning.catalog import load_catalog
from shared.platform.failures import JobFailure
from shared.platform.records import JobRecord
from shared.platform.settings import Settings
from shared.platform.storage import Storage

EVAL_BATCH_SIZE = 8  # rows: 16 sequences a forward pass with their mismatched KL rows
LOSS_TOLERANCE = 1e-3  # a KTO loss this close to the base's is "unchanged"
RANKING = ("preference_accuracy", "logp_margin", "desirable_logp", "undesirable_logp")  # both models
REWARD = ("loss", "reward_accuracy", "desirable_reward", "undesirable_reward", "kl")  # against the base


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
    """Score the base model and the job's adapter on its held-out feedback rows; the report (`build_report`).
    `group_field`: the row field whose values are reported as groups (None: no groups). `watch`: stops the
    scoring (EvaluationCancelled) once the job has moved on. The chat evaluator's generation options do not
    apply."""
    entry = load_catalog(settings).get(record.model)
    if entry is None:
        raise JobFailure("model_not_found", f"model {record.model!r} is no longer in the catalog", "model")
    trust = settings.allow_trust_remote_code
    device = default_device()
    hp = record.hyperparameters
    weights = {"desirable_weight": hp.desirable_weight, "undesirable_weight": hp.undesirable_weight}
    with tempfile.TemporaryDirectory(prefix=f"tunery-eval-{record.id}-") as tmp:
        workdir = Path(tmp)
        base_dir = materialize(entry, settings)
        storage.download_prefix(record.artifacts["tokenizer"], workdir / "tokenizer")
        storage.download_prefix(record.artifacts["adapter"], workdir / "adapter")
        examples, source = read_validation_rows(redis, storage, record, workdir)

        tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer", trust_remote_code=trust)
        eos_ids = generation_eos_ids(base_dir, tokenizer, trust_remote_code=trust)
        rows, _ = tokenize_feedback(
            tokenizer, examples, hp.max_seq_length, eos_token_ids=eos_ids, dataset="validation",
            group_field=group_field,
        )  # fmt: skip
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model = load_causal_lm(base_dir, trust_remote_code=trust, dtype=weights_dtype(device)).to(device)
        # The adapter goes into `model` in place; with it disabled, the same weights are the base.
        tuned = PeftModel.from_pretrained(model, workdir / "adapter")
        with watching(watch, model):
            scores = evaluate_feedback(
                tuned,
                iter_feedback_batches(rows, EVAL_BATCH_SIZE, pad_id, hp.max_seq_length),
                hp.beta,
                **weights,
            )
    return build_report(source, scores, beta=hp.beta, group_field=group_field, **weights)


def build_report(
    source: str,
    scores: dict[str, Any],
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    group_field: str | None = DEFAULT_GROUP_FIELD,
) -> dict[str, Any]:
    """The evaluation report from `evaluate_feedback` of the tuned adapter against its base.

    {validation_source, n_examples, n_desirable, n_undesirable, beta, desirable_weight, undesirable_weight,
    base and fine_tuned {preference_accuracy, logp_margin, desirable_logp, undesirable_logp, loss,
    reward_accuracy, desirable_reward, undesirable_reward, kl} (the base's KTO figures hold by definition:
    rewards and kl 0, loss half the mean class weight, reward accuracy None), verdict (improved, unchanged or
    regressed, by the KTO loss against the base's), loss_change, preference_accuracy_change,
    logp_margin_change, verdict_summary, by_group (None unless some row has a group)}.
    """
    base_loss = _base_loss(scores, desirable_weight, undesirable_weight)
    base, tuned = _base(scores, base_loss), _tuned(scores)
    change = tuned["loss"] - base_loss
    verdict = (
        "improved" if change < -LOSS_TOLERANCE else "regressed" if change > LOSS_TOLERANCE else "unchanged"
    )
    report: dict[str, Any] = {
        "validation_source": source,
        "n_examples": scores["n_examples"],
        "n_desirable": scores["n_desirable"],
        "n_undesirable": scores["n_undesirable"],
        "beta": beta,
        "desirable_weight": desirable_weight,
        "undesirable_weight": undesirable_weight,
        "base": base,
        "fine_tuned": tuned,
        "verdict": verdict,
        "loss_change": change,
        "preference_accuracy_change": _difference(tuned, base, "preference_accuracy"),
        "logp_margin_change": _difference(tuned, base, "logp_margin"),
    }
    ordering = (
        f"desirable-over-undesirable ordering {base['preference_accuracy']:.2f} → {tuned['preference_accuracy']:.2f}"
        if report["preference_accuracy_change"] is not None
        else "no ordering (the rows hold one label only)"
    )
    report["verdict_summary"] = (
        f"KTO loss {base_loss:.4f} → {tuned['loss']:.4f} ({change:+.4f}); reward accuracy "
        f"{tuned['reward_accuracy']:.2f} (chance 0.5), rewards {_signed(tuned['desirable_reward'])} desirable, "
        f"{_signed(tuned['undesirable_reward'])} undesirable; {ordering} on {scores['n_examples']} rows "
        f"({scores['n_desirable']} desirable)"
    )
    report["by_group"] = _by_group(scores, desirable_weight, undesirable_weight, group_field)
    return report


def _base_loss(scores: dict[str, Any], desirable_weight: float, undesirable_weight: float) -> float:
    """The base's KTO loss on these rows: its rewards and z_ref are 0, so each row costs half its weight."""
    weighted = desirable_weight * scores["n_desirable"] + undesirable_weight * scores["n_undesirable"]
    return 0.5 * weighted / scores["n_examples"]


def _base(scores: dict[str, Any], loss: float) -> dict[str, Any]:
    """The base's figures: its ranking (the reference's, from the same pass), and the KTO figures it has
    by definition as its own reference."""
    ranking = {key: scores[f"reference_{key}"] for key in RANKING}
    return ranking | {
        "loss": loss,
        "reward_accuracy": None,
        "desirable_reward": 0.0,
        "undesirable_reward": 0.0,
        "kl": 0.0,
    }


def _tuned(scores: dict[str, Any]) -> dict[str, Any]:
    return {key: scores[key] for key in RANKING + REWARD}


def _difference(tuned: dict[str, Any], base: dict[str, Any], key: str) -> float | None:
    return None if tuned[key] is None or base[key] is None else tuned[key] - base[key]


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def _by_group(
    scores: dict[str, Any], desirable_weight: float, undesirable_weight: float, group_field: str | None
) -> dict[str, Any] | None:
    """{field, n_without_group, groups {value: {n_examples, n_desirable, base, fine_tuned}}, gaps {base:
    {preference_accuracy}, fine_tuned: {preference_accuracy, reward_accuracy}: {gap, best_group,
    worst_group}}, gap_change {preference_accuracy: fine-tuned gap minus base gap, > 0 when tuning widened
    it}}; a group with one label only has no ordering figures."""
    if scores["by_group"] is None:
        return None
    per_group = {
        group: {
            "n_examples": figures["n_examples"],
            "n_desirable": figures["n_desirable"],
            "base": _base(figures, _base_loss(figures, desirable_weight, undesirable_weight)),
            "fine_tuned": _tuned(figures),
        }
        for group, figures in scores["by_group"]["groups"].items()
    }

    def gap(name: str, metric: str) -> dict[str, Any] | None:
        return largest_gap({group: values[name] for group, values in per_group.items()}, metric)

    gaps = {
        "base": {"preference_accuracy": gap("base", "preference_accuracy")},
        "fine_tuned": {
            metric: gap("fine_tuned", metric) for metric in ("preference_accuracy", "reward_accuracy")
        },
    }
    before, after = gaps["base"]["preference_accuracy"], gaps["fine_tuned"]["preference_accuracy"]
    return {
        "field": group_field,
        "n_without_group": scores["by_group"]["n_without_group"],
        "groups": per_group,
        "gaps": gaps,
        "gap_change": {
            "preference_accuracy": None if before is None or after is None else after["gap"] - before["gap"]
        },
    }
