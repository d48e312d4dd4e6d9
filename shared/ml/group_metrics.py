"""Metrics per group of rows (a `group` field in the data, e.g. a language, a region, a customer segment),
and the gap between the best and the worst group, so a model that serves some groups worse than others
shows it in its report instead of hiding it in an average.

Shared by the classification metrics and the causal-LM evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def group_members(groups: Sequence[Any]) -> dict[str, list[int]]:
    """The row indices of each group value (as a string), groups in sorted order; rows whose group is
    None belong to no group."""
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        if group is not None:
            members.setdefault(str(group), []).append(i)
    return dict(sorted(members.items()))


def largest_gap(
    per_group: Mapping[str, Mapping[str, Any]], metric: str, *, higher_is_better: bool = True
) -> dict[str, Any] | None:
    """{gap, best_group, worst_group} of `metric` over the groups that have a value for it (None: none do).

    The gap is how much better the best group is than the worst, a number ≥ 0 whichever way the metric
    points. On ties the first group (in the mapping's order) is the worst and the last the best, so a
    set of equal groups still names two.
    """
    ranked = sorted(
        (group for group, values in per_group.items() if values.get(metric) is not None),
        key=lambda group: per_group[group][metric],
    )
    if not ranked:
        return None
    low, high = ranked[0], ranked[-1]
    best, worst = (high, low) if higher_is_better else (low, high)
    gap = per_group[high][metric] - per_group[low][metric]
    return {"gap": gap, "best_group": best, "worst_group": worst}


def pool_token_metrics(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The loss, perplexity and token accuracy of the union of disjoint sets of rows, each scored by
    `lm_metrics.evaluate_causal_lm`: exact, because both are per-token averages (weighted by n_tokens)."""
    parts = [part for part in parts if part["n_tokens"]]
    n_tokens = sum(int(part["n_tokens"]) for part in parts)
    if n_tokens == 0:
        raise ValueError("no trainable tokens to evaluate on")
    loss = math.fsum(part["loss"] * part["n_tokens"] for part in parts) / n_tokens
    correct = math.fsum(part["mean_token_accuracy"] * part["n_tokens"] for part in parts)
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,  # math.exp overflows past ~709
        "mean_token_accuracy": correct / n_tokens,
        "n_tokens": n_tokens,
    }
