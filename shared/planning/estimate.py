"""Estimates before a job runs: tokens, optimizer steps, peak memory, duration and cost per GPU class.

Pure arithmetic on facts gathered elsewhere (token lengths from the real tokenizer and template,
parameter counts from the weights' headers), so the same numbers come out in the API's estimate
and on a created job. Token and step counts are exact; memory and time are models, stated below.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from shared.planning.cost import cost_usd
from shared.planning.gpu_classes import GpuClass
from shared.planning.model_facts import ModelFacts
from shared.planning.packing import packed_padded_tokens, packed_row_count
from shared.platform.records import Hyperparameters


@dataclass(frozen=True)
class DataStats:
    """Token lengths (whole conversations, before truncation) of the training and validation rows that
    train: examples the sequence length leaves nothing to learn are skipped (shared.ml.chat_data.Skipped)."""

    train_lengths: list[int]
    valid_lengths: list[int]
    validation_source: str

    @property
    def n_train(self) -> int:
        return len(self.train_lengths)


def count_optimizer_steps(
    n_examples: int,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    n_epochs: int,
    num_processes: int = 1,
) -> int:
    """Optimizer steps of the training loop: a short last batch and a short last window each count."""
    batches_per_process = math.ceil(math.ceil(n_examples / micro_batch_size) / num_processes)
    return n_epochs * math.ceil(batches_per_process / gradient_accumulation_steps)


def percentile(values: Sequence[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else 0


def token_summary(lengths: Sequence[int], max_seq_length: int) -> dict[str, int]:
    return {
        "total": sum(min(n, max_seq_length) for n in lengths),
        "p50": percentile(lengths, 0.5),
        "p95": percentile(lengths, 0.95),
        "max": max(lengths, default=0),
        "truncated_examples": sum(n > max_seq_length for n in lengths),
    }


def padded_tokens_per_epoch(
    lengths: Sequence[int], micro_batch_size: int, max_seq_length: int, seed: int
) -> int:
    """Tokens computed per epoch when each batch is padded to its longest row (shuffled batches)."""
    truncated = [min(n, max_seq_length) for n in lengths]
    random.Random(seed).shuffle(truncated)
    return sum(
        max(truncated[i : i + micro_batch_size]) * len(truncated[i : i + micro_batch_size])
        for i in range(0, len(truncated), micro_batch_size)
    )


@dataclass(frozen=True)
class Workload:
    """How a job's method trains, as far as memory and compute go (the default: supervised LoRA); each
    method says its own (shared.methods: `Method.workload`)."""

    sequences_per_example: int = 1  # dpo: 2, the prompt with each reply, in the same micro-batch
    full: bool = False  # every weight trains (classification method "full"), in fp32
    lm_head: bool = True  # logits over the vocabulary (a classifier's head scores a few classes instead)
    reference_forward: bool = False  # dpo: the frozen reference (adapter disabled) scores every token too


SUPERVISED = Workload()

# Memory model for training, per device (bytes):
# - frozen weights: 2 bytes/param in bf16 on GPUs, 4 in fp32 on CPUs;
# - trained parameters (LoRA's, or every one in full fine-tuning) with fp32 weight, gradient and two Adam
#   moments: 16 bytes each;
# - activations kept for backward: ~34 bytes × tokens × hidden per layer in 16-bit (Korthikanti et
#   al. 2022, no recomputation, memory-efficient attention), doubled in fp32 (CPUs, full fine-tuning);
# - logits and their gradient in fp32 over the vocabulary: 8 bytes × tokens × vocab (causal LMs);
# - a fixed runtime overhead (CUDA context, allocator slack): 1.5 GiB on GPUs, 0.5 GiB on CPUs.
GIB = 1024**3


def peak_memory_gib(
    facts: ModelFacts,
    micro_batch_size: int,
    seq_len: int,
    lora_r: int,
    on_gpu: bool,
    workload: Workload = SUPERVISED,
) -> float:
    weights = facts.n_params * 16 if workload.full else facts.n_params * (2 if on_gpu else 4)
    trained = 0 if workload.full else facts.lora_params(lora_r) * 16
    tokens = micro_batch_size * seq_len * workload.sequences_per_example
    activation_bytes = 34 if on_gpu and not workload.full else 68
    total = (
        weights
        + trained
        + activation_bytes * tokens * facts.hidden_size * facts.num_layers
        + (8 * tokens * facts.vocab_size if workload.lm_head else 0)
        + (1.5 if on_gpu else 0.5) * GIB
    )
    return total / GIB


def training_flops_per_token(facts: ModelFacts, seq_len: int, workload: Workload = SUPERVISED) -> float:
    """LoRA: forward (2N) and backward through activations (2N), no weight gradients for the frozen
    base; full fine-tuning adds the weight gradients (2N); DPO's reference adds a forward (2N); plus
    attention scores (forward and backward ≈ 6 × layers × seq × hidden per token)."""
    per_param = 4 + (2 if workload.full else 0) + (2 if workload.reference_forward else 0)
    return per_param * facts.n_params + 6 * facts.num_layers * seq_len * facts.hidden_size


def achieved_flops(gpu_class: GpuClass, calibrated: float | None) -> tuple[float, str]:
    """FLOP/s per device: measured on earlier jobs of this class when known, else peak × assumed MFU."""
    if calibrated:
        return calibrated, "measured on earlier jobs of this class"
    return gpu_class.peak_tflops * 1e12 * gpu_class.assumed_mfu, (
        f"{gpu_class.assumed_mfu:.0%} of the class's peak {gpu_class.peak_tflops:g} TFLOP/s (not measured yet)"
    )


def build_estimate(
    stats: DataStats,
    facts: ModelFacts,
    hp: Hyperparameters,
    *,
    lora_r: int,
    seed: int,
    classes: dict[str, GpuClass],
    calibration: dict[str, float],
    workload: Workload = SUPERVISED,
) -> dict:
    """Tokens and steps (exact), and memory, duration and cost for every configured GPU class.

    With two sequences per example (DPO), `stats` holds each pair's tokens, both sides cut already.
    """
    seq = hp.max_seq_length
    cap = seq * workload.sequences_per_example  # an example's most tokens
    train = token_summary(stats.train_lengths, cap)
    valid_tokens = sum(min(n, cap) for n in stats.valid_lengths)
    if hp.packing:
        rows = packed_row_count(stats.train_lengths, seq)
        steps = count_optimizer_steps(
            rows, hp.micro_batch_size, hp.gradient_accumulation_steps, hp.n_epochs, hp.processes
        )
        padded = packed_padded_tokens(stats.train_lengths, seq, hp.micro_batch_size, seed, hp.n_epochs)
        attention_len = seq  # masked attention still scores the whole row
    else:
        steps = count_optimizer_steps(
            stats.n_train, hp.micro_batch_size, hp.gradient_accumulation_steps, hp.n_epochs, hp.processes
        )
        padded = padded_tokens_per_epoch(stats.train_lengths, hp.micro_batch_size, cap, seed) * hp.n_epochs
        attention_len = int(train["total"] / max(1, stats.n_train * workload.sequences_per_example))
    train_flops = training_flops_per_token(facts, attention_len, workload) * padded
    forwards = 2 if workload.reference_forward else 1  # per validation token, each time it is scored
    flops = train_flops + forwards * 2 * facts.n_params * valid_tokens * (hp.n_epochs + 2)  # + evaluation
    per_class = {}
    for name, gpu_class in classes.items():
        speed, speed_reason = achieved_flops(gpu_class, calibration.get(name))
        # The work shared by every device (linear scaling assumed: data-parallel LoRA steps need few bytes
        # of gradients per step); the cost counts every device for the whole run.
        seconds = flops / (speed * hp.processes)
        memory = peak_memory_gib(facts, hp.micro_batch_size, seq, lora_r, name != "cpu", workload)
        per_class[name] = {
            "peak_memory_gib": round(memory, 2),
            "fits": memory <= gpu_class.memory_gb,
            "devices": hp.processes,
            "duration_seconds": seconds,
            "cost_usd": cost_usd(gpu_class, seconds * hp.processes),
            "speed": speed_reason,
        }
    return {
        "train_examples": stats.n_train,
        "valid_examples": len(stats.valid_lengths),
        "validation_source": stats.validation_source,
        "train_tokens": train,
        "trained_tokens": train["total"] * hp.n_epochs,
        "valid_tokens": valid_tokens,
        "optimizer_steps": steps,
        "padded_tokens": padded,
        "padding_waste": round(1 - train["total"] * hp.n_epochs / padded, 4) if padded else 0.0,
        "flops": flops,
        "train_flops": train_flops,
        "model_parameters": facts.n_params,
        "trainable_parameters": facts.n_params if workload.full else facts.lora_params(lora_r),
        "gpu_classes": per_class,
    }
