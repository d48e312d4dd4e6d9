"""Classification examples (`text`, `label`) → training tensors, shared by the trainer and the evaluator.

The label vocabulary comes from the training examples alone and is recorded beside the trained model
(`labels.json`), so inference maps class ids back to the user's labels and the evaluator scores with the
same ids the model was trained with. A validation label the training data never had cannot be predicted,
so it is an error naming the example, not a silently wrong score.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from shared.data.formats import Example, read_examples
from shared.ml.chat_data import DataError
from shared.planning.hyperparams import FULL_FINE_TUNE_MAX_PARAMS

LABELS_FILE = "labels.json"
DEFAULT_GROUP_FIELD = "group"  # Example.fields key whose values `evaluate_classifier` reports by_group
HEAD_NAMES = ("classifier", "score")  # transformers' names for the classification head


@dataclass
class TokenizedClassification:
    input_ids: list[int]
    label: int  # the class id: the label's index in the label vocabulary
    group: str | None  # the example's grouping value (fields[group_field]) as a string, if it has one
    truncated: bool


def read_classification_examples(path: Path, filename: str) -> list[Example]:
    """The examples of a classification dataset (any container shared.data.formats reads); `filename`
    (the uploaded name) tells its container."""
    with open(path, "rb") as f:
        examples = list(read_examples(f, filename=filename))
    if examples and examples[0].kind != "classification":
        raise DataError(
            f"{filename} holds {examples[0].kind} examples, not classification rows (text, label)"
        )
    return examples


def label_vocabulary(examples: Sequence[Example]) -> list[str]:
    """The sorted distinct labels of the training examples; a class id is a label's index in this list.

    Integer-like labels ("0", "2", "10") sort by value, anything else by its string: the same labels in
    any order always give the same ids.
    """
    labels = set()
    for i, example in enumerate(examples):
        labels.add(_label_of(example, i, "training"))
    if len(labels) < 2:
        raise DataError(
            f"the training data has {len(labels)} distinct label{'s' if len(labels) != 1 else ''} "
            f"({', '.join(repr(label) for label in sorted(labels))}); classification needs at least 2"
        )
    if all(_is_int(label) for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))
    return sorted(labels)


def class_weights(examples: Sequence[TokenizedClassification], n_classes: int) -> torch.Tensor:
    """Per-class loss weights for class_weights="balanced": n_examples / (n_classes × the class's count)
    (scikit-learn's rule), so every class contributes the same total weight, however rare it is."""
    counts = Counter(example.label for example in examples)
    return torch.tensor(
        [len(examples) / (n_classes * counts[c]) if counts[c] else 0.0 for c in range(n_classes)],
        dtype=torch.float32,
    )


def tokenize_classification(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    labels: Sequence[str],
    max_length: int,
    *,
    dataset: str = "training",
    group_field: str | None = DEFAULT_GROUP_FIELD,
) -> tuple[list[TokenizedClassification], list[str]]:
    """Token ids (with the tokenizer's special tokens, truncated to `max_length`) and class ids.

    Errors name the example: a missing text or label, and a label outside `labels` (for validation data:
    one the training data does not have). Returns warnings about truncated examples.
    """
    label_ids = {label: i for i, label in enumerate(labels)}
    class_ids = []
    for i, example in enumerate(examples):
        label = _label_of(example, i, dataset)
        if label not in label_ids:
            shown = ", ".join(repr(known) for known in labels[:20]) + (", …" if len(labels) > 20 else "")
            raise DataError(
                f"{dataset} example {i} ({example.source or f'row {i + 1}'}): label {label!r} does not occur "
                f"in the training data, so the model cannot predict it (training labels: {shown})"
            )
        if not isinstance(example.text, str) or not example.text.strip():
            raise DataError(f"{dataset} example {i} ({example.source or f'row {i + 1}'}): the text is empty")
        class_ids.append(label_ids[label])
    texts = [example.text or "" for example in examples]
    # One batched call (fast tokenizers parallelise it); only the overlong are tokenized again, truncated,
    # so the tokenizer places its closing special tokens (BERT's [SEP]) after the cut.
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    tokenized = []
    for i, example in enumerate(examples):
        truncated = len(ids[i]) > max_length
        if truncated:
            ids[i] = tokenizer(texts[i], add_special_tokens=True, truncation=True, max_length=max_length)[
                "input_ids"
            ]
        group = example.fields.get(group_field) if group_field else None
        tokenized.append(
            TokenizedClassification(
                input_ids=list(ids[i]),
                label=class_ids[i],
                group=None if group is None else str(group),
                truncated=truncated,
            )
        )
    truncated = [i for i, example in enumerate(tokenized) if example.truncated]
    if not truncated:
        return tokenized, []
    first = truncated[0]
    return tokenized, [
        f"{len(truncated)} of {len(tokenized)} {dataset} examples are longer than the maximum sequence "
        f"length ({max_length} tokens) and were truncated, e.g. example {first} "
        f"({examples[first].source or f'row {first + 1}'}); the model sees only their beginning"
    ]


def is_encoder(config: PretrainedConfig) -> bool:
    """A masked-LM encoder (BERT, MiniLM, DeBERTa…): reads the whole text at once, and is small enough to
    fine-tune whole; anything else (decoders) is trained with LoRA and a head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def resolve_method(
    method: str, model_dir: Path, model: torch.nn.Module | None, *, trust_remote_code: bool
) -> Literal["full", "lora"]:
    """The training method "auto" stands for: full for encoders up to FULL_FINE_TUNE_MAX_PARAMS, else
    LoRA. Before the model is loaded (model None), "auto" answers from its config alone whether weights
    will be fully trained (an encoder architecture)."""
    if method in ("full", "lora"):
        return method
    if method != "auto":
        raise ValueError(f"method must be 'auto', 'full' or 'lora', not {method!r}")
    config = (
        model.config
        if model is not None
        else AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    )
    if not is_encoder(config):
        return "lora"
    if model is None:
        return "full"  # provisional: the size is known once loaded
    n_params = sum(p.numel() for p in model.parameters())
    return "full" if n_params <= FULL_FINE_TUNE_MAX_PARAMS else "lora"


def classification_head(model: torch.nn.Module) -> list[str]:
    """The name of the model's classification head, which trains whole beside a LoRA adapter."""
    head = [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), torch.nn.Module)]
    if not head:
        raise ValueError(
            f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}; "
            "train it with method 'full'"
        )
    return head


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id batches are padded with: the tokenizer's pad token, else (decoders) its EOS."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise DataError(
        f"model {tokenizer.name_or_path}: the tokenizer has neither a pad token nor an EOS token to pad with"
    )


def collate_classification(
    examples: Sequence[TokenizedClassification], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch (dynamic padding); padding gets no attention.

    Decoder classifiers read the last non-pad token, which right padding keeps in place.
    """
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
    labels = torch.tensor([example.label for example in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def iter_classification_batches(
    examples: Sequence[TokenizedClassification], batch_size: int, pad_token_id: int
) -> Iterator[dict[str, Any]]:
    """Evaluation batches, longest examples first (less padding; an out-of-memory shows at once). Each also
    holds `groups`: the examples' grouping values (None where an example has none)."""
    ordered = sorted(examples, key=lambda example: len(example.input_ids), reverse=True)
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i : i + batch_size]
        batch: dict[str, Any] = collate_classification(chunk, pad_token_id)
        batch["groups"] = [example.group for example in chunk]
        yield batch


# -- artifacts ------------------------------------------------------------------------------------------


def write_labels(output_dir: Path, labels: Sequence[str], **extra: Any) -> Path:
    """`labels.json`: {"labels": [...], "id2label": {"0": ...}, ...extra}; class id i is labels[i]."""
    path = Path(output_dir) / LABELS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"labels": list(labels), "id2label": {str(i): label for i, label in enumerate(labels)}, **extra}
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path


def read_labels(path: Path) -> dict[str, Any]:
    """A `labels.json` (its path, or the directory holding it) as written by `write_labels`."""
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILE
    return json.loads(path.read_text())


def load_sequence_classifier(
    base_dir: Path,
    labels: Sequence[str],
    *,
    pad_token_id: int,
    trust_remote_code: bool,
    dtype: torch.dtype,
    adapter_dir: Path | None = None,
    model_dir: Path | None = None,
) -> torch.nn.Module:
    """A sequence classifier with `labels` as its classes, ready for `evaluate_classifier`.

    - neither `adapter_dir` nor `model_dir`: the base model with a fresh (randomly initialised, seeded by
      the caller's torch seed) head: the "untuned" baseline;
    - `adapter_dir`: the base model plus a trained LoRA adapter and head (method "lora");
    - `model_dir`: fully fine-tuned weights (method "full"); `base_dir` is then unused.
    """

    source = model_dir if model_dir is not None else base_dir
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        pad_token_id=pad_token_id,
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model


def _label_of(example: Example, index: int, dataset: str) -> str:
    if example.kind != "classification" or example.label is None:
        raise DataError(
            f"{dataset} example {index} ({example.source or f'row {index + 1}'}) is a {example.kind} "
            "example without a label, not a classification row"
        )
    return str(example.label)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
