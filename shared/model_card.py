"""The model card (README.md) published with a fine-tuned model: what it is, what it was trained on,
how it compares with its base, what it cost, and what it should not be used for."""

from __future__ import annotations

import json
from typing import Any

from shared.catalog import CatalogEntry
from shared.records import FileRecord, JobRecord


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
    rows = "\n".join(
        f"| {name} | {base_metrics[key]:.4f} | {tuned[key]:.4f} |"
        for name, key in (
            ("loss", "loss"),
            ("perplexity", "perplexity"),
            ("token accuracy", "mean_token_accuracy"),
        )
    )
    settings = {
        k: v for k, v in (hp.model_dump(exclude={"reasons"}) if hp else {}).items() if v is not None
    } | {"lora": job.lora.model_dump(), "seed": job.seed}
    return f"""---
base_model: {job.model}
library_name: peft
tags: [tunery, lora, fine-tuned]
---

# {job.fine_tuned_model}

A LoRA fine-tune of {base_line}, made by Tunery job `{job.id}` for organization `{job.tenant}`.

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

Verdict: **{report["verdict"]}** (loss change {report["loss_change"]:+.4f}).

## Cost

{job.usage.device_seconds:.1f} device-seconds on GPU class `{job.gpu_class}`, ${job.usage.cost_usd:.4f};
{job.trained_tokens or 0} tokens trained.

## Intended use and limitations

This adapter specialises its base model to the conversations of the training file. It inherits the
base model's licence, knowledge and biases; the evaluation above covers loss on held-out rows of the
same data only, not safety, factuality or behaviour outside that data. Evaluate it on your own cases
before deploying it, and do not use it where its errors could harm people.

## Files

- `adapter/`: the LoRA adapter (PEFT, safetensors); load it with `PeftModel.from_pretrained(base, "adapter")`.
- `tokenizer/`: the tokenizer and its chat template.
- `merged/` (when exported): the base with the adapter merged in, loadable by `transformers` and vLLM alone.
- `evaluation.json`: the full evaluation report.
"""
