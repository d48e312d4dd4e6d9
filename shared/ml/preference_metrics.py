"""The DPO loss and the held-out metrics of a preference-tuned causal LM, shared by trainer and evaluator.

Two families of numbers, because they answer different questions:

- The DPO implicit reward, beta × (log π(reply) − log π_ref(reply)) summed over the reply's tokens: what
  DPO optimises. `reward_accuracy` is the share of pairs whose chosen reply gets the higher reward,
  `reward_margin` the mean chosen-minus-rejected reward, `loss` the mean DPO loss. They measure the tuned
  model against its reference (the base: the same model with the adapter disabled), so for the base
  itself they are 0 by definition (its loss is log 2) and cannot be shown beside the tuned model's.
- The model's own ranking, comparable between base and tuned: `preference_accuracy` is the share of pairs
  where the model gives the chosen reply a higher mean log-probability per token than the rejected one,
  `logp_margin` the mean of that difference. Length-normalised because a summed log-likelihood prefers the
  shorter reply whatever its quality. With a reference, the same figures for it come as
  `reference_preference_accuracy` and `reference_logp_margin`: the base and the tuned model side by side.

Pairs may carry a group (`PreferencePair.group`); the report then holds the same metrics per group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F

from shared.ml.chat_data import IGNORE_INDEX
from shared.ml.lm_loss import label_logits, supports_kept_logits, trained_positions

Reference = Literal["adapter"] | torch.nn.Module | None


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens (fp32, keeps the graph) and their count.

    Position t's logits predict the label at t + 1, as in `lm_metrics.token_stats`; only labelled positions
    are upcast, so there is no fp32 copy of every position's logits.
    """
    targets = labels[:, 1:].to(logits.device)
    mask = targets != IGNORE_INDEX
    token_logps = -F.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="none")
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(len(labels), dtype=torch.float32, device=logits.device).index_add(0, rows, token_logps)
    return sums, mask.sum(dim=1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: the sigmoid DPO loss and the implicit rewards of the chosen and the rejected reply.

    loss = −log σ(beta × ((π_c − ref_c) − (π_r − ref_r))) on summed reply log-probabilities. With
    `label_smoothing` ε (conservative DPO), each label is taken to be wrong with probability ε:
    loss = −(1 − ε) log σ(h) − ε log σ(−h), which stops the margin from growing without bound.
    """
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    margin = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def pair_logps(model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of a `collate_pairs` batch in one forward pass: rows are chosen sides, then
    rejected sides. The batch is moved to the model's device."""
    device = next(model.parameters()).device
    inputs = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
    }
    # Logits only where a reply token is predicted (shared/ml/lm_loss.py): the same sums as
    # `sequence_logps` of the full logits, without the prompts' and padding's output layer.
    logits, targets, rows = label_logits(model, inputs, batch["labels"], kept=supports_kept_logits(model))
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    sums = torch.zeros(len(inputs["input_ids"]), dtype=torch.float32, device=device).index_add(
        0, rows, token_logps
    )
    return sums, trained_positions(batch["labels"].to(device)).sum(dim=1)


def evaluate_preferences(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    beta: float,
    *,
    reference: Reference = "adapter",
) -> dict[str, Any]:
    """Score held-out preference pairs (`iter_preference_batches` batches) with `model`.

    `reference`: "adapter" (the default) compares a peft model with itself, adapter disabled (the base it
    was tuned from, no second copy in memory); a module compares with that model (e.g. the base beside a
    merged model); None scores `model` alone (e.g. the base), with its own ranking only, since its implicit
    reward is 0 by definition. Runs in eval mode without gradients and restores the model's mode.

    Returns {n_pairs, preference_accuracy, logp_margin, and with a reference: loss, reward_accuracy,
    reward_margin, chosen_reward, rejected_reward, reference_preference_accuracy, reference_logp_margin;
    by_group: None, or {groups: {value: the same metrics for its pairs}, n_without_group}}.
    """
    if reference == "adapter" and not hasattr(model, "disable_adapter"):
        raise ValueError("reference='adapter' needs a peft model; score a base model with reference=None")
    models = [model] + ([reference] if isinstance(reference, torch.nn.Module) else [])
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    columns: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("policy", "policy_n", "reference", "reference_n")
    }
    groups: list[str | None] = []
    try:
        with torch.no_grad():
            for batch in batches:
                logps, n_tokens = pair_logps(model, batch)
                columns["policy"].append(logps.double().cpu())
                columns["policy_n"].append(n_tokens.cpu())
                if reference is not None:
                    if isinstance(reference, torch.nn.Module):
                        scorer, context = reference, nullcontext()
                    else:
                        scorer, context = model, model.disable_adapter()
                    with context:
                        logps, n_tokens = pair_logps(scorer, batch)
                    columns["reference"].append(logps.double().cpu())
                    columns["reference_n"].append(n_tokens.cpu())
                n_pairs = len(batch["input_ids"]) // 2
                groups += list(batch.get("groups") or [None] * n_pairs)
    finally:
        for m, was_training in zip(models, modes, strict=True):
            m.train(was_training)
    if not groups:
        raise ValueError("no preference pairs to evaluate on")
    per_pair = _per_pair(columns, beta)
    report = _metrics(per_pair, torch.arange(len(groups)))
    report["by_group"] = None
    if any(group is not None for group in groups):
        members: dict[str, list[int]] = {}
        for i, group in enumerate(groups):
            if group is not None:
                members.setdefault(group, []).append(i)
        report["by_group"] = {
            "groups": {
                group: _metrics(per_pair, torch.tensor(rows)) for group, rows in sorted(members.items())
            },
            "n_without_group": sum(group is None for group in groups),
        }
    return report


def summary(report: Mapping[str, Any]) -> dict[str, float]:
    """The flat numbers of a report (without by_group), for progress events and metrics rows."""
    return {k: float(v) for k, v in report.items() if k != "by_group"}


def _per_pair(columns: dict[str, list[torch.Tensor]], beta: float) -> dict[str, torch.Tensor]:
    """Chosen-minus-rejected figures per pair, from rows that are chosen sides, then rejected sides."""

    def halves(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = zip(*(t.chunk(2) for t in columns[name]), strict=True)
        return torch.cat(chosen), torch.cat(rejected)

    policy_c, policy_r = halves("policy")
    n_c, n_r = halves("policy_n")
    out = {"logp_margin": policy_c / n_c - policy_r / n_r}
    if columns["reference"]:
        reference_c, reference_r = halves("reference")
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_c, policy_r, reference_c, reference_r, beta
        )
        out.update(
            loss=losses,
            chosen_reward=chosen_rewards,
            rejected_reward=rejected_rewards,
            reward_margin=chosen_rewards - rejected_rewards,
            reference_logp_margin=reference_c / n_c - reference_r / n_r,
        )
    return out


def _metrics(per_pair: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, Any]:
    """The report's figures over the pairs at indices `rows`."""

    def mean(name: str) -> float:
        return float(per_pair[name][rows].mean())

    def wins(name: str) -> float:
        return float((per_pair[name][rows] > 0).double().mean())

    report: dict[str, Any] = {"n_pairs": len(rows)}
    report.update(preference_accuracy=wins("logp_margin"), logp_margin=mean("logp_margin"))
    if "loss" in per_pair:
        report.update(
            loss=mean("loss"),
            reward_accuracy=wins("reward_margin"),
            reward_margin=mean("reward_margin"),
            chosen_reward=mean("chosen_reward"),
            rejected_reward=mean("rejected_reward"),
            reference_preference_accuracy=wins("reference_logp_margin"),
            reference_logp_margin=mean("reference_logp_margin"),
        )
    return report
