"""Loss, accuracy, macro-F1, per-class scores, confusion matrix, and the same per group, of a classifier.

Pure torch and Python (no scikit-learn). The definitions follow scikit-learn's defaults so numbers can be
compared with it: precision of a class never predicted and recall of a class without support are 0; the
macro average runs over the classes that occur in the true or the predicted labels of the set scored
(`f1_score(average="macro")` without `labels=`), so a group lacking a class is not charged for it.
Loss is the mean cross-entropy per example (unweighted, no label smoothing), over the whole set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from shared.ml.group_metrics import group_members, largest_gap


def evaluate_classifier(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score a sequence classifier on `batches` (from `iter_classification_batches`: input_ids,
    attention_mask, labels, and optionally groups); moved to the model's device, run in eval mode without
    gradients, the model's previous mode restored.

    `labels` name the class ids (default: the model config's id2label). Returns `classification_report`
    of all the examples, with `by_group` filled when any example carries a group.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    y_true: list[int] = []
    y_pred: list[int] = []
    losses: list[float] = []
    groups: list[str | None] = []
    try:
        with torch.no_grad():
            for batch in batches:
                logits = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                ).logits.float()
                target = batch["labels"].to(device)
                losses += F.cross_entropy(logits, target, reduction="none").tolist()
                y_pred += logits.argmax(dim=-1).tolist()
                y_true += target.tolist()
                groups += list(batch.get("groups") or [None] * len(target))
    finally:
        model.train(was_training)
    if not y_true:
        raise ValueError("no examples to evaluate on")
    n_classes = logits.shape[-1]
    if labels is None:
        id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
        labels = [str(id2label.get(i, i)) for i in range(n_classes)]
    return classification_report(y_true, y_pred, labels, losses=losses, groups=groups)


def classification_report(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    labels: Sequence[str],
    *,
    losses: Sequence[float] | None = None,
    groups: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Metrics of predicted class ids against true ones; `labels[i]` names class id i.

    {loss (when `losses`, one per example), accuracy, macro_f1, n_examples, labels, per_class {label:
    {precision, recall, f1, support}}, confusion_matrix (rows: true class, columns: predicted, both in
    `labels` order), by_group}. `by_group` is None unless some example has a group; then {groups: {value:
    the same metrics for its examples}, n_without_group, accuracy_gap, macro_f1_gap (best group minus
    worst), and which groups those are}.
    """
    report = _metrics(y_true, y_pred, labels, losses)
    report["by_group"] = None
    if groups is not None and any(group is not None for group in groups):
        report["by_group"] = _by_group(y_true, y_pred, labels, losses, groups)
    return report


def summary(report: Mapping[str, Any]) -> dict[str, float]:
    """The flat numbers of a report, for progress events and metrics rows."""
    out = {"loss": report.get("loss"), "accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}
    out["n_examples"] = report["n_examples"]
    by_group = report.get("by_group")
    if by_group:
        out["accuracy_gap"] = by_group["accuracy_gap"]
        out["macro_f1_gap"] = by_group["macro_f1_gap"]
    return {k: v for k, v in out.items() if v is not None}


def _metrics(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str], losses: Sequence[float] | None
) -> dict[str, Any]:
    n_classes = len(labels)
    confusion = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(y_true, y_pred, strict=True):
        confusion[t][p] += 1
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for c, label in enumerate(labels):
        tp = confusion[c][c]
        support = sum(confusion[c])
        predicted = sum(row[c] for row in confusion)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support or predicted:
            f1s.append(f1)
    n = len(y_true)
    report: dict[str, Any] = {}
    if losses is not None:
        report["loss"] = math.fsum(losses) / n if n else math.nan
    report.update(
        accuracy=sum(confusion[c][c] for c in range(n_classes)) / n if n else math.nan,
        macro_f1=sum(f1s) / len(f1s) if f1s else math.nan,
        n_examples=n,
        labels=list(labels),
        per_class=per_class,
        confusion_matrix=confusion,
    )
    return report


def _by_group(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    labels: Sequence[str],
    losses: Sequence[float] | None,
    groups: Sequence[str | None],
) -> dict[str, Any]:
    members = group_members(groups)
    per_group = {
        group: _metrics(
            [y_true[i] for i in rows],
            [y_pred[i] for i in rows],
            labels,
            None if losses is None else [losses[i] for i in rows],
        )
        for group, rows in members.items()
    }
    out: dict[str, Any] = {"groups": per_group, "n_without_group": sum(g is None for g in groups)}
    for metric in ("accuracy", "macro_f1"):
        gap = largest_gap(per_group, metric)
        assert gap is not None  # every group has examples, so every group has a score
        out[f"{metric}_gap"] = gap["gap"]
        out[f"{metric}_best_group"] = gap["best_group"]
        out[f"{metric}_worst_group"] = gap["worst_group"]
    return out
