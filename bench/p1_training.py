"""P1: training throughput of Tunery's SFT recipe against a plain Hugging Face Trainer.

Both train the same LoRA (r 16, alpha 32, dropout 0.05, every linear layer) on the same tokenized alpaca
demo rows (Tunery's chat tokenization, so both see identical tokens and labels), same batch size, same
learning rate and linear schedule, one process, the same torch threads (the CPUs this process may use,
`usable_cpus`, as the trainer's launcher sets them). The peer pads each batch to its longest row; Tunery
packs when a job's "auto" packing would (`auto_packing`: at least 25 % fewer computed tokens), else pads
the same way, and computes logits only where a trained label is predicted (shared/ml/lm_loss.py). The
figure is useful tokens/s: non-pad tokens of the steps after the first, over their wall time. MFU is
6 × matmul parameters × useful tokens/s over the matmul peak measured in the same run.

    .venv/bin/python bench/p1_training.py [--repeats 3] [--steps 12] [--packing auto|on|off] [--threads N]
        [--device cuda --layers 8 --hidden 1024]

On a machine shared with other work, two threads per process can spend most of their time waiting for
each other; `BENCH_THREADS=1 bench/run --only p1_training.py` then compares both sides at one thread.

Levers weighed on the 2-core CPU (torch 2.13, one thread, process CPU time per step of 4 padded alpaca
rows at 128 tokens): logits only at trained positions 0.47-0.50 s against 0.66-0.74 s for full logits;
packing's dense mask costs nothing measurable there (see shared/ml/packing.py); torch.compile of the
LoRA model paid nothing back (compiled steps 0.533 s against 0.517 s eager, after 31 s of compiler CPU
time in the process alone and 586 s of wall time under load), so the recipes do not compile. Later, on
an Intel Xeon (one thread, 4 rows at 128 tokens): the cross-entropy in fewer passes over the kept logits
(shared/ml/lm_loss.py) took the step from 0.36 s to 0.30 s. What remains is matmuls (half the step), the
LoRA dropout's random masks (a tenth) and elementwise ops.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: F401 - puts the repository on sys.path
import torch
from common import (
    alpaca_conversations,
    build_llama,
    chat_examples,
    emit,
    matmul_parameters,
    matmul_peak_flops,
)
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from services.trainer.driver import StepMetrics
from services.trainer.recipes.sft import SFTConfig, train_sft
from shared.methods.supervised import auto_packing
from shared.ml.chat_data import tokenize_dataset
from shared.ml.model_loading import weights_dtype
from shared.planning.hyperparams import auto_max_seq_length
from shared.platform.cpus import usable_cpus

LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LEARNING_RATE = 2e-4


def useful_rate(marks: list[tuple[float, int]]) -> float:
    """Non-pad tokens/s between the end of the first step and the end of the last (the first step pays
    for warm-up: allocations, kernel selection)."""
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0)


class _Marks:
    """Tunery's hooks: the time and cumulative non-pad tokens at the end of every optimizer step."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def on_step(self, m: StepMetrics) -> None:
        self.marks.append((time.perf_counter(), m.trained_tokens))

    def on_epoch_end(self, epoch: int, valid_metrics: dict[str, float] | None) -> None:
        pass

    def should_stop(self) -> None:
        return None


class _TrainerMarks(TrainerCallback):
    """The same marks from the Trainer (its non-padding input token count)."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))


def tunery(model_dir: Path, rows: list, args: argparse.Namespace) -> float:
    hooks = _Marks()
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            model_dir=model_dir, output_dir=Path(tmp), train_examples=chat_examples(rows), valid_examples=None, n_epochs=1,
            batch_size=args.batch_size, learning_rate=LEARNING_RATE, lora_r=LORA["r"], lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"], target_modules=None, max_seq_length=args.max_length, seed=0,
            packing=args.packing == "on", torch_threads=args.threads,
        )  # fmt: skip
        train_sft(config, hooks)
    return useful_rate(hooks.marks)


def peer(model_dir: Path, rows: list, args: argparse.Namespace) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = tokenize_dataset(tokenizer, rows, args.max_length, eos_token_ids={tokenizer.eos_token_id})
    data = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights_dtype(device))
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        target_modules="all-linear",
    )  # fmt: skip
    model = get_peft_model(model, lora)
    marks = _TrainerMarks()
    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, learning_rate=LEARNING_RATE,
            lr_scheduler_type="linear", max_steps=args.steps, max_grad_norm=1.0, weight_decay=0.0, seed=0,
            logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
            include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
            use_cpu=args.device == "cpu",
        )  # fmt: skip
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        Trainer(
            model=model, args=training, train_dataset=data, data_collator=collator, callbacks=[marks]
        ).train()
    return useful_rate(marks.marks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--steps", type=int, default=24, help="the peer's steps; both sides see their rows")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--max-length",
        default="auto",
        help="tokens; default: what a job's auto max_seq_length picks for the rows",
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--packing", choices=("auto", "on", "off"), default="auto", help="Tunery's side")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("BENCH_THREADS", 0)) or usable_cpus(),
        help="torch threads of both sides (default: $BENCH_THREADS, else the CPUs this process may use)",
    )
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps = 4
    dtype = weights_dtype(torch.device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_llama(
            Path(tmp) / "model", layers=args.layers, hidden=args.hidden, intermediate=4 * args.hidden,
            heads=max(4, args.hidden // 64),
        )  # fmt: skip
        params = matmul_parameters(AutoModelForCausalLM.from_pretrained(model_dir))
        rows = alpaca_conversations(args.batch_size * args.steps)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        context = AutoConfig.from_pretrained(model_dir).max_position_embeddings
        whole, _ = tokenize_dataset(tokenizer, rows, context, eos_token_ids={tokenizer.eos_token_id})
        length_reason = "set"
        if args.max_length == "auto":
            args.max_length, length_reason = auto_max_seq_length([len(e.input_ids) for e in whole], context)
        args.max_length = int(args.max_length)
        packing_reason = f"packing {args.packing}"
        if args.packing == "auto":
            examples, _ = tokenize_dataset(
                tokenizer, rows, args.max_length, eos_token_ids={tokenizer.eos_token_id}
            )
            lengths = [len(e.input_ids) for e in examples]
            packing, packing_reason = auto_packing(lengths, args.max_length, args.batch_size, seed=0)
            args.packing = "on" if packing else "off"
        # Large enough to reach the peak: a 2048² matmul already does on two CPU cores, a GPU needs more.
        peak_n = 8192 if args.device == "cuda" else 2048
        peaks = [matmul_peak_flops(args.device, str(dtype).removeprefix("torch."), peak_n)]
        results: dict[str, list[float]] = {"tunery": [], "peer": []}
        for repeat in range(args.repeats):
            for side, run in (
                (("tunery", tunery), ("peer", peer))
                if repeat % 2 == 0
                else (("peer", peer), ("tunery", tunery))
            ):
                results[side].append(run(model_dir, rows, args))
                print(f"P1 repeat {repeat + 1} {side}: {results[side][-1]:.0f} useful tokens/s", flush=True)
                gc.collect()
        peaks.append(matmul_peak_flops(args.device, str(dtype).removeprefix("torch."), peak_n))
    peak = max(peaks)

    def mfu(rates: list[float]) -> list[float]:
        return [6 * params * rate / peak for rate in rates]

    shape = f"{args.layers} layers × {args.hidden}, vocab 30,524, {params / 1e6:.1f}M matmul parameters"
    setup = (
        f"{shape}; {args.device} {str(dtype).removeprefix('torch.')}; {len(rows)} rows, batch {args.batch_size}, "
        f"max length {args.max_length} ({length_reason}), the peer's {args.steps} steps and Tunery's (the first "
        "of each not timed), LoRA r16 all-linear; "
        f"{args.threads} torch threads; Tunery: {packing_reason}, logits only at trained positions"
    )
    emit(
        [
            {
                "id": "P1", "benchmark": "SFT training throughput (alpaca demo)", "unit": "useful tokens/s",
                "tunery": results["tunery"], "peer": results["peer"],
                "peer_name": "transformers.Trainer + peft, DataCollatorForSeq2Seq (dynamic padding)",
                "setup": setup, "extra": {"matmul_parameters": params, "matmul_peak_flops": peaks},
            },
            {
                "id": "P1-MFU", "benchmark": "useful-token MFU (6·N·tokens/s ÷ measured matmul peak)",
                "unit": "MFU", "tunery": mfu(results["tunery"]), "peer": mfu(results["peer"]),
                "peer_name": "the same Trainer run", "setup": f"peak {peak / 1e9:.0f} GFLOP/s (best of "
                f"{len(peaks)} timed {str(dtype).removeprefix('torch.')} {peak_n}² matmuls); {shape}",
            },
        ]
    )  # fmt: skip
    print(f"median MFU tunery {statistics.median(mfu(results['tunery'])):.3f}", flush=True)


if __name__ == "__main__":
    main()
