"""The evaluation of a classification job: the untuned model and the fine-tuned classifier on the same
held-out rows.

The untuned model is the base model with a fresh classification head initialised from the job's seed, as
the recipe initialised the head it then trained: what the job started from. Both are scored with
`shared.ml.classification_metrics` (accuracy, macro-F1, per-class precision, recall and F1, the confusion
matrix), overall and, when rows carry a group field, per group with the gap between the best and the worst
group. The verdict follows the accuracy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from redis import Redis
from transformers import AutoTokenizer

from services.evaluator.cancellation import CancelWatch, watching
from shared.ml.classification_data import (
    DEFAULT_GROUP_FIELD,
    iter_classification_batches,
    load_sequence_classifier,
    pad_token_id,
    read_labels,
    tokenize_classification,
)
from shared.ml.classification_metrics import evaluate_classifier
from shared.ml.group_metrics import largest_gap
from shared.ml.materialize import materialize
from shared.ml.model_loading import default_device, weights_dtype
from shared.ml.task_data import read_validation_rows
from shared.planning.catalog import load_catalog
from shared.platform.failures import JobFailure
from shared.platform.records import JobRecord
from shared.platform.settings import Settings
from shared.platform.storage import Storage

EVAL_BATCH_SIZE = 32
# An accuracy change smaller than this is "unchanged" (half a percentage point).
ACCURACY_TOLERANCE = 0.005
METRICS = ("accuracy", "macro_f1")  # compared overall and per group; both higher is better


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
    """Score the untuned model (fresh head) and the job's classifier on its held-out rows; the report
    (`build_report`). `group_field`: the row field whose values are reported as groups (None: no groups).
    `watch`: stops the scoring (EvaluationCancelled) once the job has moved on. The report's `task` is the
    job's method; the chat evaluator's generation options do not apply."""
    entry = load_catalog(settings).get(record.model)
    if entry is None:
        raise JobFailure("model_not_found", f"model {record.model!r} is no longer in the catalog", "model")
    trust = settings.allow_trust_remote_code
    device = default_device()
    with tempfile.TemporaryDirectory(prefix=f"tunery-eval-{record.id}-") as tmp:
        workdir = Path(tmp)
        base_dir = materialize(entry, settings)
        storage.download_file(record.artifacts["labels"], workdir / "labels.json")
        saved = read_labels(workdir / "labels.json")
        labels = list(saved["labels"])
        storage.download_prefix(record.artifacts["tokenizer"], workdir / "tokenizer")
        weights = "model" if "model" in record.artifacts else "adapter"
        storage.download_prefix(record.artifacts[weights], workdir / weights)
        examples, source = read_validation_rows(redis, storage, record, workdir)

        tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer", trust_remote_code=trust)
        rows, _ = tokenize_classification(
            tokenizer, examples, labels, record.hyperparameters.max_seq_length, dataset="validation",
            group_field=group_field,
        )  # fmt: skip
        pad_id = saved.get("pad_token_id")
        pad_id = pad_token_id(tokenizer) if pad_id is None else int(pad_id)
        # As trained: fp32 weights for a full fine-tune, the base's training dtype under a LoRA adapter.
        options = {
            "pad_token_id": pad_id,
            "trust_remote_code": trust,
            "dtype": torch.float32 if weights == "model" else weights_dtype(device),
        }

        def score(model: torch.nn.Module) -> dict[str, Any]:
            batches = iter_classification_batches(rows, EVAL_BATCH_SIZE, pad_id)
            with watching(watch, model):
                return evaluate_classifier(model.to(device), batches, labels)

        torch.manual_seed(record.seed)  # the head the recipe started from
        base = score(load_sequence_classifier(base_dir, labels, **options))
        trained = (
            {"model_dir": workdir / "model"} if weights == "model" else {"adapter_dir": workdir / "adapter"}
        )
        tuned = score(load_sequence_classifier(base_dir, labels, **trained, **options))
    return {"task": record.method_type, **build_report(source, base, tuned, group_field=group_field)}


def build_report(
    source: str, base: dict[str, Any], tuned: dict[str, Any], *, group_field: str | None = DEFAULT_GROUP_FIELD
) -> dict[str, Any]:
    """The evaluation report from two `evaluate_classifier` reports on the same rows.

    {validation_source, n_examples, labels, base and fine_tuned {accuracy, macro_f1, loss, per_class,
    confusion_matrix}, verdict (improved, unchanged or regressed, by the accuracy), accuracy_change,
    macro_f1_change, verdict_summary (the numbers behind the verdict in one line), by_group (None unless
    some row has a group)}.
    """
    change = tuned["accuracy"] - base["accuracy"]
    verdict = (
        "improved"
        if change > ACCURACY_TOLERANCE
        else "regressed"
        if change < -ACCURACY_TOLERANCE
        else "unchanged"
    )
    report: dict[str, Any] = {
        "validation_source": source,
        "n_examples": tuned["n_examples"],
        "labels": tuned["labels"],
        "base": _figures(base),
        "fine_tuned": _figures(tuned),
        "verdict": verdict,
        "accuracy_change": change,
        "macro_f1_change": tuned["macro_f1"] - base["macro_f1"],
    }
    report["verdict_summary"] = (
        f"accuracy {base['accuracy']:.4f} → {tuned['accuracy']:.4f} ({change:+.4f}), macro-F1 "
        f"{base['macro_f1']:.4f} → {tuned['macro_f1']:.4f} ({report['macro_f1_change']:+.4f}) on "
        f"{report['n_examples']} rows"
    )
    report["by_group"] = _by_group(base, tuned, group_field)
    return report


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "macro_f1", "loss", "per_class", "confusion_matrix")
    return {key: report[key] for key in keys}


def _by_group(base: dict[str, Any], tuned: dict[str, Any], group_field: str | None) -> dict[str, Any] | None:
    """{field, n_without_group, groups {value: {n_examples, base, fine_tuned}}, gaps {base, fine_tuned:
    {metric: {gap, best_group, worst_group}}}, gap_change {metric: fine-tuned gap minus base gap, > 0 when
    fine-tuning widened it}}: the shape of the causal-LM evaluation's."""
    if base["by_group"] is None:
        return None
    per_group = {
        group: {
            "n_examples": scores["n_examples"],
            "base": _figures(scores),
            "fine_tuned": _figures(tuned["by_group"]["groups"][group]),
        }
        for group, scores in base["by_group"]["groups"].items()
    }
    gaps = {
        name: {
            metric: largest_gap({group: values[name] for group, values in per_group.items()}, metric)
            for metric in METRICS
        }
        for name in ("base", "fine_tuned")
    }
    return {
        "field": group_field,
        "n_without_group": base["by_group"]["n_without_group"],
        "groups": per_group,
        "gaps": gaps,
        "gap_change": {
            metric: gaps["fine_tuned"][metric]["gap"] - gaps["base"][metric]["gap"] for metric in METRICS
        },
    }
