"""Per-token loss, perplexity and accuracy of a causal LM on labelled batches.

Training and evaluation share `token_stats`, so "loss" means the same thing everywhere: summed over
trainable tokens and divided by their number over the whole set, never a mean of per-batch means (which
overweights the tokens of short batches).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.ml.chat_data import IGNORE_INDEX


@dataclass
class TokenStats:
    loss_sum: torch.Tensor  # scalar, summed cross-entropy of the trainable tokens (keeps the graph)
    n_correct: torch.Tensor  # scalar, trainable tokens whose argmax prediction is the label
    n_tokens: torch.Tensor  # scalar, trainable tokens


def token_stats(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> TokenStats:
    """Sums over trainable tokens: position t's logits predict the label at t + 1.

    `label_smoothing` (training only) spreads that share of each target's probability over the
    vocabulary, a regularizer against over-confident predictions; evaluation always uses 0.
    """
    targets = labels[:, 1:].to(logits.device)
    mask = targets != IGNORE_INDEX
    # Only trainable positions are upcast: fp32 cross-entropy without an fp32 copy of every position's logits.
    picked = logits[:, :-1][mask].float()
    targets = targets[mask]
    loss_sum = F.cross_entropy(picked, targets, reduction="sum", label_smoothing=label_smoothing)
    n_correct = (picked.argmax(dim=-1) == targets).sum()
    return TokenStats(loss_sum, n_correct, mask.sum())


def evaluate_causal_lm(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
) -> dict[str, float]:
    """Loss per trainable token, perplexity and token accuracy over all `batches`.

    Batches are `collate` outputs (input_ids, attention_mask, labels); they are moved to the model's device.
    Runs in eval mode without gradients and restores the model's previous mode.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, n_correct, n_tokens = 0.0, 0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                logits = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,
                ).logits
                stats = token_stats(logits, batch["labels"])
                loss_sum += stats.loss_sum.item()
                n_correct += int(stats.n_correct)
                n_tokens += int(stats.n_tokens)
    finally:
        model.train(was_training)
    if n_tokens == 0:
        raise ValueError("no trainable tokens to evaluate on")
    loss = loss_sum / n_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,  # math.exp overflows past ~709
        "mean_token_accuracy": n_correct / n_tokens,
        "n_tokens": n_tokens,
    }
