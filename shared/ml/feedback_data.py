"""Feedback examples (KTO's unpaired data) → tokens, the KTO loss and held-out figures, shared by data
preparation, the trainer and the evaluator.

A feedback row is a chat conversation whose last message is the assistant's completion, with a boolean
`label`: true when the completion is desirable, false when it is not (LLaMA-Factory's `kto_en_demo`, TRL's
unpaired preference rows in OpenAI message form). Such a file parses as chat (shared.data.formats keeps
`label` in `Example.fields`), so it is uploaded and reported as any chat file; `read_feedback_examples`
then checks what KTO needs of every row and names the row and field of each problem.

The prompt (every message but the last, marked `"weight": 0`) and the completion are rendered together with
the model's chat template by `chat_data`'s tokenization, so labels cover the completion alone (its content
and end-of-turn token), located as in supervised training. A row too long is cut as preference pairs are:
the prompt keeps its end, the completion its beginning and at least half of `max_length`.

The KTO loss is TRL's sigmoid KTO (`KTOTrainer`, Ethayarajh et al. 2024): the reward of a completion is
β × (log π − log π_ref) summed over its tokens; the reference point z_ref is the mean log-ratio of
mismatched prompt/completion pairs of the same batch (each prompt with the previous row's completion, as
TRL rotates them), detached and at least 0; a desirable completion costs 1 − σ(β(r − z)) and an undesirable
one 1 − σ(β(z − r)), weighted by desirable_weight and undesirable_weight.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from shared.data.formats import Example, read_examples
from shared.ml.chat_data import (
    IGNORE_INDEX,
    SOURCES_NAMED,
    DataError,
    Skipped,
    TokenizedExample,
    check_eos,
    collate,
    tokenize_all,
)
from shared.ml.model_loading import generation_eos_ids
from shared.ml.preference_metrics import pair_logps
from shared.planning.estimate import DataStats
from shared.platform.failures import JobFailure
from shared.platform.records import Hyperparameters

DEFAULT_GROUP_FIELD = "group"  # Example.fields key whose values the figures are reported by
LABEL_FIELD = "label"  # true: a desirable completion, false: an undesirable one
UNBOUNDED = 1 << 40  # tokenize whole rows first: the sequence length is chosen from them
# TRL's recommendation (KTO paper, eq. 8): desirable_weight × n_desirable over undesirable_weight ×
# n_undesirable within [1, 4/3].
BALANCE_RANGE = (1.0, 4 / 3)

Reference = Literal["adapter"] | None


@dataclass
class FeedbackExample:
    prompt_ids: list[int]  # the (possibly cut) prompt: every message but the last, with the generation prompt
    completion_ids: list[int]
    completion_labels: list[int]  # the completion's tokens where trained, else IGNORE_INDEX
    desirable: bool
    group: str | None  # the row's grouping value (fields[group_field]) as a string, if it has one
    truncated: bool

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    def row(
        self, completion: FeedbackExample | None = None, max_length: int | None = None
    ) -> TokenizedExample:
        """Its prompt followed by its own completion, or by `completion`'s (a mismatched pair for the KL
        estimate, cut to `max_length`)."""
        other = completion or self
        ids = self.prompt_ids + other.completion_ids
        labels = [IGNORE_INDEX] * len(self.prompt_ids) + other.completion_labels
        end = max_length or len(ids)
        return TokenizedExample(ids[:end], labels[:end], len(ids) > end)


# -- reading ----------------------------------------------------------------------------------------------


def read_feedback_examples(path: Path, filename: str) -> list[Example]:
    """The rows of a feedback file (chat rows with a boolean `label`, in any container shared.data.formats
    reads); DataError naming the rows and fields that are not feedback."""
    with open(path, "rb") as f:
        examples = list(read_examples(f, filename=filename))
    if examples and examples[0].kind != "chat":
        raise DataError(
            f"{filename} holds {examples[0].kind} examples, not feedback rows (chat messages ending with the "
            "assistant's completion, and a boolean label)"
        )
    problems = [f"{e.source}: {problem}" for e in examples if (problem := feedback_problem(e))]
    if problems:
        more = f"; and {len(problems) - SOURCES_NAMED} more" if len(problems) > SOURCES_NAMED else ""
        raise DataError(
            f"{len(problems)} of {len(examples)} rows of {filename} are not feedback rows: "
            + "; ".join(problems[:SOURCES_NAMED])
            + more
        )
    return examples


def feedback_problem(example: Example) -> str | None:
    """What keeps a chat row from being a feedback row, as `field: reason`, or None."""
    messages = example.messages or []
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        last = messages[-1].get("role") if messages else None
        return f"messages: the last message must be the assistant's completion after a prompt, not {last!r}"
    if LABEL_FIELD not in example.fields:
        return f'missing "{LABEL_FIELD}" (true: a desirable completion, false: an undesirable one)'
    label = example.fields[LABEL_FIELD]
    if not isinstance(label, bool):
        return f"{LABEL_FIELD}: must be true or false, got {label!r}"
    return None


# -- tokenization -----------------------------------------------------------------------------------------


def tokenize_feedback(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int,
    *,
    eos_token_ids: Collection[int] | None = None,
    dataset: str = "training",
    group_field: str | None = DEFAULT_GROUP_FIELD,
) -> tuple[list[FeedbackExample], list[str]]:
    """Every row's prompt and completion in tokens, cut to `max_length`, and warnings about cut rows;
    errors name the row."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, not {max_length}")
    for i, example in enumerate(examples):
        if problem := feedback_problem(example):
            raise DataError(f"{dataset} example {i} ({example.source}): {problem}")
    # Weight 0 on the prompt: earlier assistant turns are context; only the completion is scored.
    conversations = [
        [{**m, "weight": 0} for m in messages[:-1]]
        + [{k: v for k, v in messages[-1].items() if k != "weight"}]
        for messages in (e.messages or [] for e in examples)
    ]
    sources = [e.source for e in examples]
    rows = tokenize_all(
        tokenizer, conversations, sys.maxsize, eos_token_ids=eos_token_ids, dataset=dataset, sources=sources
    )
    tokenized = []
    for i, (example, row) in enumerate(zip(examples, rows, strict=True)):
        start = next((j for j, label in enumerate(row.labels) if label != IGNORE_INDEX), None)
        if start is None:
            raise DataError(
                f"{dataset} example {i} ({example.source}): the chat template rendered no tokens for the completion"
            )
        completion = len(row.input_ids) - start
        keep = min(start, max(max_length - completion, max_length // 2))  # prompt tokens kept, from its end
        end = start + max_length - keep
        group = example.fields.get(group_field) if group_field else None
        tokenized.append(
            FeedbackExample(
                prompt_ids=row.input_ids[start - keep : start],
                completion_ids=row.input_ids[start:end],
                completion_labels=row.labels[start:end],
                desirable=example.fields[LABEL_FIELD],
                group=None if group is None else str(group),
                truncated=keep < start or len(row.input_ids) > end,
            )
        )
    warnings = []
    cut = [i for i, e in enumerate(tokenized) if e.truncated]
    if cut:
        warnings.append(
            f"{len(cut)} of {len(tokenized)} {dataset} feedback rows are longer than the maximum sequence length "
            f"({max_length} tokens) and were cut, e.g. example {cut[0]} ({examples[cut[0]].source}): prompts "
            "keep their end and completions their beginning"
        )
    return tokenized, warnings


def collate_feedback(
    examples: Sequence[FeedbackExample], pad_token_id: int, max_length: int
) -> dict[str, torch.Tensor]:
    """One right-padded batch: each row's prompt with its completion (input_ids, attention_mask, labels),
    the same prompts each with the previous row's completion for the KL estimate (kl_input_ids,
    kl_attention_mask, kl_labels; TRL's rotation: row 0 takes the last row's), and `desirable`."""
    matched = collate([e.row() for e in examples], pad_token_id)
    mismatched = collate([e.row(examples[i - 1], max_length) for i, e in enumerate(examples)], pad_token_id)
    return {
        **matched,
        **{f"kl_{key}": value for key, value in mismatched.items()},
        "desirable": torch.tensor([e.desirable for e in examples], dtype=torch.bool),
    }


def iter_feedback_batches(
    examples: Sequence[FeedbackExample], batch_size: int, pad_token_id: int, max_length: int
) -> Iterator[dict[str, Any]]:
    """Evaluation batches of `batch_size` rows, longest first (less padding; an out-of-memory shows at
    once). Each also holds `groups`: the rows' grouping values (None where a row has none)."""
    ordered = sorted(examples, key=lambda e: e.n_tokens, reverse=True)
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i : i + batch_size]
        batch: dict[str, Any] = collate_feedback(chunk, pad_token_id, max_length)
        batch["groups"] = [e.group for e in chunk]
        yield batch


def kl_rows(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The mismatched rows of a `collate_feedback` batch, as a batch of their own."""
    return {key: batch[f"kl_{key}"] for key in ("input_ids", "attention_mask", "labels")}


# -- the loss ---------------------------------------------------------------------------------------------


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the weighted sigmoid KTO loss and the reward β × (log π − log π_ref) (detached).

    `kl`: the mean log-ratio of the batch's mismatched pairs (`kl_estimate`, averaged over processes
    where there are several), or one per row (each its batch's); it is detached and clamped at 0 here, as
    TRL does after averaging.
    """
    logratios = policy_logps - reference_logps
    z = kl.detach().clamp(min=0)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - F.sigmoid(beta * (logratios - z))),
        undesirable_weight * (1 - F.sigmoid(beta * (z - logratios))),
    )
    return losses, beta * logratios.detach()


def kl_estimate(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point before clamping: the mean log-ratio of the mismatched pairs (detached)."""
    return (policy_kl_logps - reference_kl_logps).mean().detach()


def balanced_weights(
    desirable_weight: float | None, undesirable_weight: float | None, n_desirable: int, n_undesirable: int
) -> tuple[float, float, str]:
    """The "auto" class weights: those not set (None) chosen so that desirable_weight × n_desirable equals
    undesirable_weight × n_undesirable (the low end of TRL's recommended [1, 4/3]), and the reason."""
    n_d, n_u = max(n_desirable, 1), max(n_undesirable, 1)
    if desirable_weight is not None and undesirable_weight is not None:
        return desirable_weight, undesirable_weight, "set by the request"
    counts = f"auto: {n_desirable} desirable and {n_undesirable} undesirable training rows"
    why = "so that weight × rows is the same for both labels (the low end of the 1 to 4/3 TRL recommends)"
    # Both auto: the rarer label's weight rises, the other keeps 1.
    if desirable_weight is None and (undesirable_weight is not None or n_d < n_u):
        weight = (undesirable_weight or 1.0) * n_u / n_d
        return weight, undesirable_weight or 1.0, f"{counts}; desirable_weight {weight:.4g} {why}"
    weight = (desirable_weight or 1.0) * n_d / n_u
    return desirable_weight or 1.0, weight, f"{counts}; undesirable_weight {weight:.4g} {why}"


def balance_note(
    desirable_weight: float, undesirable_weight: float, n_desirable: int, n_undesirable: int
) -> str | None:
    """TRL's warning when the weighted counts fall outside its recommended ratio, else None."""
    ratio = desirable_weight * max(n_desirable, 1) / (undesirable_weight * max(n_undesirable, 1))
    low, high = BALANCE_RANGE
    if low - 1e-9 <= ratio <= high + 1e-9:  # balanced weights give 1 up to rounding
        return None
    return (
        f"desirable_weight × {n_desirable} desirable rows is {ratio:.2f} × undesirable_weight × "
        f"{n_undesirable} undesirable rows; KTO's authors and TRL recommend a ratio between 1 and 4/3"
    )


# -- held-out figures -------------------------------------------------------------------------------------


def evaluate_feedback(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    *,
    reference: Reference = "adapter",
) -> dict[str, Any]:
    """Score held-out feedback rows (`iter_feedback_batches` batches) with `model`.

    Each model's own figures, comparable between base and tuned, from the mean log-probability per token of
    each completion (length-normalised, as a summed one favours short completions whatever their quality):
    `desirable_logp` and `undesirable_logp` (their means over the rows), `logp_margin` (desirable −
    undesirable) and `preference_accuracy`, the share of desirable–undesirable row pairs whose desirable
    completion scores higher (the AUC of the score as a desirability classifier; ties count half).

    `reference="adapter"` also scores the peft model with its adapter disabled (the base it was tuned from)
    and adds what KTO optimises: `loss` (the weighted KTO loss, z_ref estimated per batch), `kl` (z_ref, at
    least 0, averaged over the rows), `reward_accuracy` (the share of rows whose reward is > 0 when desirable and < 0 when not),
    `desirable_reward` and `undesirable_reward`, and the base's own figures as `reference_<name>`.
    `reference=None` scores `model` alone. Runs in eval mode without gradients and restores the mode.

    Returns {n_examples, n_desirable, n_undesirable, the figures above, by_group: None, or {groups:
    {value: the same figures for its rows}, n_without_group}}.
    """
    if reference == "adapter" and not hasattr(model, "disable_adapter"):
        raise ValueError("reference='adapter' needs a peft model; score a base model with reference=None")
    columns: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("policy", "n_tokens", "desirable", "reference", "kl")
    }
    groups: list[str | None] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                logps, n_tokens = pair_logps(model, batch)
                columns["policy"].append(logps.double().cpu())
                columns["n_tokens"].append(n_tokens.cpu())
                columns["desirable"].append(batch["desirable"].cpu())
                if reference == "adapter":
                    policy_kl, _ = pair_logps(model, kl_rows(batch))
                    with model.disable_adapter():
                        reference_logps, _ = pair_logps(model, batch)
                        reference_kl, _ = pair_logps(model, kl_rows(batch))
                    columns["reference"].append(reference_logps.double().cpu())
                    z = kl_estimate(policy_kl.double(), reference_kl.double()).clamp(min=0).cpu()
                    columns["kl"].append(z.expand(len(logps)))
                groups += list(batch.get("groups") or [None] * len(logps))
    finally:
        model.train(was_training)
    if not groups:
        raise ValueError("no feedback rows to evaluate on")
    rows = {name: torch.cat(values) for name, values in columns.items() if values}
    rows["score"] = rows["policy"] / rows["n_tokens"]
    if "reference" in rows:
        rows["reference_score"] = rows["reference"] / rows["n_tokens"]
        # Each row with the z_ref of its own batch.
        rows["loss"], rows["reward"] = kto_loss(
            rows["policy"], rows["reference"], rows["desirable"], rows["kl"], beta, desirable_weight,
            undesirable_weight,
        )  # fmt: skip
    report = _figures(rows, torch.arange(len(groups)))
    report["by_group"] = None
    if any(group is not None for group in groups):
        members: dict[str, list[int]] = {}
        for i, group in enumerate(groups):
            if group is not None:
                members.setdefault(group, []).append(i)
        report["by_group"] = {
            "groups": {group: _figures(rows, torch.tensor(ids)) for group, ids in sorted(members.items())},
            "n_without_group": sum(group is None for group in groups),
        }
    return report


def summary(report: Mapping[str, Any]) -> dict[str, float]:
    """The flat numbers of a report (without by_group; figures a set cannot have, e.g. the margin of a set
    without undesirable rows, left out), for progress events and metrics rows."""
    return {k: float(v) for k, v in report.items() if k != "by_group" and v is not None}


def ordering_accuracy(desirable: torch.Tensor, undesirable: torch.Tensor) -> float | None:
    """The share of (desirable, undesirable) pairs whose desirable score is higher, ties counting half (the
    Mann–Whitney AUC), by sorting rather than comparing every pair; None without both kinds."""
    if not len(desirable) or not len(undesirable):
        return None
    ordered = undesirable.sort().values
    below = torch.searchsorted(ordered, desirable, side="left")
    at_most = torch.searchsorted(ordered, desirable, side="right")
    wins = below.double() + 0.5 * (at_most - below).double()
    return float(wins.sum() / (len(desirable) * len(undesirable)))


def _figures(rows: dict[str, torch.Tensor], ids: torch.Tensor) -> dict[str, Any]:
    desirable = rows["desirable"][ids]

    def mean(name: str, where: torch.Tensor) -> float | None:
        values = rows[name][ids][where]
        return float(values.mean()) if len(values) else None

    def ranking(score: str, prefix: str = "") -> dict[str, Any]:
        good, bad = mean(score, desirable), mean(score, ~desirable)
        return {
            f"{prefix}desirable_logp": good,
            f"{prefix}undesirable_logp": bad,
            f"{prefix}logp_margin": None if good is None or bad is None else good - bad,
            f"{prefix}preference_accuracy": ordering_accuracy(
                rows[score][ids][desirable], rows[score][ids][~desirable]
            ),
        }

    every = torch.ones(len(ids), dtype=torch.bool)
    report: dict[str, Any] = {
        "n_examples": len(ids),
        "n_desirable": int(desirable.sum()),
        "n_undesirable": int((~desirable).sum()),
        **ranking("score"),
    }
    if "reward" in rows:
        reward = rows["reward"][ids]
        right = torch.where(desirable, reward > 0, reward < 0)
        report.update(
            loss=mean("loss", every),
            kl=mean("kl", every),
            reward_accuracy=float(right.double().mean()),
            desirable_reward=mean("reward", desirable),
            undesirable_reward=mean("reward", ~desirable),
            **ranking("reference_score", "reference_"),
        )
    return report


# -- planning ---------------------------------------------------------------------------------------------


def plan_feedback(
    tokenizer: PreTrainedTokenizerBase,
    model_dir: Path,
    rows: Any,
    resolve: Any,
    trust: bool,
    notes: list[str],
) -> tuple[Hyperparameters, DataStats, list[Skipped]]:
    """The kind's planner (services.evaluator.prepare.Planner): every row rendered with the model's template,
    the sequence length chosen from the uncut rows, the "auto" class weights from the training labels, and
    what the estimate counts (each row and its mismatched KL row: twice its tokens, as cut). No row is
    skipped: a completion keeps at least half of the sequence length."""
    eos_ids = generation_eos_ids(model_dir, tokenizer, trust_remote_code=trust)
    check_eos(tokenizer, eos_ids)

    def tokenize(
        examples: Sequence[Example], length: int, dataset: str = "training"
    ) -> list[FeedbackExample]:
        try:
            tokenized, warnings = tokenize_feedback(
                tokenizer, examples, length, eos_token_ids=eos_ids, dataset=dataset
            )
        except DataError as exc:
            raise JobFailure(
                "invalid_training_data",
                str(exc),
                "training_file" if dataset == "training" else rows.valid_param,
            ) from exc
        if length < UNBOUNDED:
            notes.extend(warnings)
        return tokenized

    uncut, uncut_valid = tokenize(rows.train, UNBOUNDED), tokenize(rows.valid, UNBOUNDED, rows.valid_name)
    hp = resolve(DataStats([e.n_tokens for e in uncut], [e.n_tokens for e in uncut_valid], rows.source))
    if hp.micro_batch_size < 2:
        raise JobFailure(
            "invalid_hyperparameters",
            f"KTO estimates its reference point from the other rows of a micro-batch, which needs at least 2 "
            f"rows; {hp.reasons['micro_batch_size']}. Choose a larger batch_size or GPU class, or a shorter "
            "max_seq_length",
            "hyperparameters",
        )
    n_desirable = sum(e.desirable for e in uncut)
    n_undesirable = len(uncut) - n_desirable
    requested = {
        name: (hp.model_extra or {}).get(name) for name in ("desirable_weight", "undesirable_weight")
    }
    desirable_weight, undesirable_weight, reason = balanced_weights(
        *requested.values(), n_desirable, n_undesirable
    )
    hp.desirable_weight, hp.undesirable_weight = desirable_weight, undesirable_weight
    for name, value in requested.items():
        if value is None:  # "auto"
            hp.reasons[name] = reason
    if note := balance_note(desirable_weight, undesirable_weight, n_desirable, n_undesirable):
        notes.append(note)
    train = tokenize(rows.train, hp.max_seq_length)
    valid = tokenize(rows.valid, hp.max_seq_length, rows.valid_name)
    stats = DataStats([2 * e.n_tokens for e in train], [2 * e.n_tokens for e in valid], rows.source)
    return hp, stats, []
