"""The model card (README.md) published with a fine-tuned model: what it is, what it was trained on,
how it compares with its base, what it cost, and what it should not be used for."""

from __future__ import annotations

import json
from typing import Any

from shared.methods import method
from shared.planning.catalog import CatalogEntry
from shared.platform.records import FileRecord, JobRecord

# What the card's tables show, in order: report key → name.
METRICS: dict[str, str] = {
    "loss": "loss",
    "perplexity": "perplexity",
    "mean_token_accuracy": "token accuracy",
    "exact_match": "exact match",
    "rouge_l": "ROUGE-L F1",
    "bleu": "BLEU",
    "chrf": "chrF",
    # classification
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    # preference (DPO)
    "preference_accuracy": "preference accuracy",
    "logp_margin": "log-prob margin (chosen − rejected)",
    "reward_accuracy": "reward accuracy",
    "reward_margin": "reward margin",
}


def render_model_card(
    job: JobRecord, base: CatalogEntry | None, training_file: FileRecord | None, report: dict[str, Any]
) -> str:
    hp = job.hyperparameters
    base_line = f"`{job.model}`" + (f" (licence: {base.license})" if base and base.license else "")
    data = "unknown (the training file was deleted)"
    privacy = ""
    if training_file is not None:
        data = (
            f"`{training_file.filename}` ({training_file.n_examples} examples, format {training_file.format})"
        )
        found = ((training_file.report or {}).get("personal_data") or {}).get("counts") or {}
        privacy = (
            "Personal data found in the training file: "
            + ", ".join(f"{n} {kind}" for kind, n in sorted(found.items()))
            + f" (data policy: {job.data_policy})."
            if found
            else "No personal data was found in the training file by Tunery's scan."
        )
    base_metrics, tuned = report["base"], report["fine_tuned"]
    measured = [key for key in METRICS if base_metrics.get(key) is not None and tuned.get(key) is not None]
    rows = "\n".join(
        f"| {METRICS[key]} | {_number(key, base_metrics[key])} | {_number(key, tuned[key])} |"
        for key in measured
    )
    settings = {
        k: v for k, v in (hp.model_dump(exclude={"reasons"}) if hp else {}).items() if v is not None
    } | {"lora": job.lora.model_dump(), "seed": job.seed}
    return f"""---
base_model: {job.model}
library_name: {"transformers" if "model" in job.artifacts else "peft"}
tags: [tunery, {job.method_type}, fine-tuned]
---

# {job.fine_tuned_model}

{method(job.method_type).model_card_kind} of {base_line}, made by Tunery job `{job.id}` for organization `{job.tenant}`.

## Training data

{data}. {privacy}

## Settings

```json
{json.dumps(settings, indent=2)}
```

## Evaluation

On {report["n_examples"]} held-out rows ({report["validation_source"]}), the same rows for both models:

| metric | base | fine-tuned |
|---|---|---|
{rows}

{_generation_note(report)}Verdict: **{report["verdict"]}**: {_verdict_detail(report)}.
{_groups_section(report)}
## Cost

{job.usage.device_seconds:.1f} device-seconds on GPU class `{job.gpu_class}`, ${job.usage.cost_usd:.4f};
{job.trained_tokens or 0} tokens trained.

## Intended use and limitations

This model specialises its base model to the task and data of the training file. It inherits the base
model's licence, knowledge and biases; the evaluation above covers held-out rows of the same data only,
not safety, factuality or behaviour outside that data. Evaluate it
on your own cases before deploying it, and do not use it where its errors could harm people.

## Files

- `adapter/`: the LoRA adapter (PEFT, safetensors; for a classifier, with its head); load it with
  `PeftModel.from_pretrained(base, "adapter")`.
- `model/` (a classifier fine-tuned whole): the weights, loadable by `AutoModelForSequenceClassification`.
- `labels.json` (a classifier): its labels, class id i being `labels[i]`.
- `tokenizer/`: the tokenizer and its chat template.
- `merged/` (when exported): the base with the adapter merged in, loadable by `transformers` and vLLM alone.
- `evaluation.json`: the full evaluation report.
- `generations.jsonl` (when replies were generated): each prompt, its reference reply, both models' replies
  and their scores.
"""


def _number(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if metric in ("bleu", "chrf") else f"{value:.4f}"


def _verdict_detail(report: dict[str, Any]) -> str:
    """The report's verdict line; reports made before it existed show the loss change alone."""
    return report.get("verdict_summary") or f"loss change {report['loss_change']:+.4f}"


def _generation_note(report: dict[str, Any]) -> str:
    generation = report.get("generation")
    if not generation:
        return ""
    # Reports made before replies were bounded by their reference's length state the cap alone.
    bound = generation.get("new_tokens") or f"at most {generation['max_new_tokens']} new tokens"
    return (
        f"Exact match, ROUGE-L, BLEU and chrF compare the {generation['decoding']} replies of each model to the "
        f"first {generation['n_examples']} rows' prompts ({bound}) "
        "with the reference replies: exact match and ROUGE-L F1 from 0 to 1, BLEU and chrF from 0 to 100; "
        "higher is better. Loss and perplexity: lower is better.\n\n"
    )


def _groups_section(report: dict[str, Any]) -> str:
    """Every metric per group of rows, and the gap between the best and the worst group."""
    by_group = report.get("by_group")
    if not by_group:
        return ""
    keys = [
        key
        for key in METRICS
        if report["base"].get(key) is not None and report["fine_tuned"].get(key) is not None
    ]
    header = "| group | rows | " + " | ".join(METRICS[key] for key in keys) + " |"
    lines = [header, "|---|---|" + "---|" * len(keys)]
    for group, values in by_group["groups"].items():
        cells = [
            f"{_number(k, values['base'].get(k))} → {_number(k, values['fine_tuned'].get(k))}" for k in keys
        ]
        name = group.replace("|", "\\|")  # a group value must not split the table row
        lines.append(f"| {name} | {values['n_examples']} | " + " | ".join(cells) + " |")
    gaps = by_group["gaps"]
    cells = []
    for key in keys:
        base_gap, tuned_gap = gaps["base"].get(key), gaps["fine_tuned"].get(key)
        if base_gap is None or tuned_gap is None:
            cells.append("–")
            continue
        cells.append(
            f"{_number(key, base_gap['gap'])} → {_number(key, tuned_gap['gap'])} (worst: {tuned_gap['worst_group']})"
        )
    lines.append("| **largest gap** | | " + " | ".join(cells) + " |")
    without = by_group["n_without_group"]
    rest = ""
    if without:
        rows_have = "1 row has" if without == 1 else f"{without} rows have"
        rest = f" {rows_have} no group and count{'s' if without == 1 else ''} only in the totals."
    return f"""
### By group

Rows grouped by their `{by_group["field"]}` field; each cell is base → fine-tuned. The largest gap is how
much better the best group scores than the worst, for the base and for the fine-tuned model (and which
group is worst after fine-tuning).{rest}

{chr(10).join(lines)}
"""
