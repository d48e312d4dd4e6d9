"""A causal LM's training loss computed only at the positions whose next token is a trained label.

The output layer of a small model with a real vocabulary is most of its matmul work (a 4 × 256 Llama with
MiniLM's 30,524-token vocabulary: 7.8M of its 12.0M matmul weights), yet the loss needs logits only where
a label is trained: not on masked prompts, padding, or the last position of each example. So the model is
asked for those rows alone, through transformers' `logits_to_keep` given as a boolean (batch × length)
mask: the final hidden states are gathered before `lm_head`, and whatever the model does after it (logit
softcapping, a logit scale) still applies. Cross-entropy then runs on the kept rows; the logits of every
other position are never computed, kept for backward, or upcast.

The kept logits are never more than today's full ones (N trained positions × vocabulary, N ≤ batch ×
length), so they are not chunked: a chunked or fused linear cross-entropy that never holds them measured
only about 5 % faster on the output layer on a CPU (370 rows, 30,524 vocabulary, one thread); on a GPU
at long lengths its memory saving is what matters, and liger-kernel's fused kernel is the tool there.
What did pay on a CPU is fewer passes over those N × vocabulary logits (`summed_cross_entropy`): torch's
log-softmax, its backward (through a zero-filled dense gradient) and a separate argmax took 80 ms for
300 rows on one thread, the softmax computed once and turned into the gradient in place 27 ms (20 % of
a 4 × 256 Llama's training step).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch

from shared.ml.chat_data import IGNORE_INDEX
from shared.ml.lm_metrics import TokenStats


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """(batch × length) bool: True where position t's logits predict a trained label at t + 1."""
    keep = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def supports_kept_logits(model: torch.nn.Module) -> bool:
    """Whether the model takes `logits_to_keep` as a boolean mask: transformers' own causal LMs do (they
    slice with `slice_logits_to_keep`); remote code may take only an int, so it gets full logits."""
    base = getattr(model, "module", model)  # under DistributedDataParallel
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # under a peft adapter
    return type(base).__module__.startswith("transformers.models.") and (
        "logits_to_keep" in inspect.signature(base.forward).parameters
    )


def label_logits(
    model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, *, kept: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits at the positions that predict a trained label (N × vocabulary, in the model's dtype),
    those labels (N) and the batch row of each (N), in row-major order.

    `kept` (see `supports_kept_logits`) computes only those rows; otherwise every position's logits are
    computed and the same rows picked from them.
    """
    device = inputs["input_ids"].device
    keep = trained_positions(labels.to(device))
    if kept:
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    else:
        logits = model(**inputs, use_cache=False).logits[keep]
    targets = labels.to(device)[:, 1:][keep[:, :-1]]
    return logits, targets, keep.nonzero()[:, 0]


def label_token_stats(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    *,
    kept: bool,
) -> TokenStats:
    """`lm_metrics.token_stats` of the model on `inputs`, from `label_logits`: the same sums (fp32
    cross-entropy, argmax accuracy) over the same trainable tokens."""
    logits, targets, _ = label_logits(model, inputs, labels, kept=kept)
    loss_sum, n_correct = summed_cross_entropy(logits.float(), targets, label_smoothing)
    return TokenStats(loss_sum, n_correct, torch.tensor(len(targets), device=targets.device))


def summed_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`F.cross_entropy(logits, targets, reduction="sum", label_smoothing=...)` and how many rows predict
    their target (the target's logit is the row's largest; a tie counts as correct), in fewer passes over
    the N × vocabulary logits, which dominate a small model's step: one exponential in all (its softmax is
    kept for backward, where the gradient is that softmax less the target, scaled), no log-softmax written
    and read back, no dense gradient filled with zeros for the target's scatter, and the accuracy from the
    row maximum the softmax needs anyway instead of a separate argmax pass."""
    return _SummedCrossEntropy.apply(logits, targets, label_smoothing)


class _SummedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        smoothing: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(len(targets), device=logits.device)
        top = logits.amax(dim=-1, keepdim=True)
        target_logits = logits[rows, targets]
        mean_logits = logits.mean(dim=-1) if smoothing else None
        softmax = torch.sub(logits, top).exp_()
        totals = softmax.sum(dim=-1, keepdim=True)
        softmax.div_(totals)
        log_z = (top + totals.log()).squeeze(-1)  # log of the partition function: logsumexp of each row
        per_row = log_z - target_logits
        if mean_logits is not None:
            per_row = (1 - smoothing) * per_row + smoothing * (log_z - mean_logits)
        ctx.save_for_backward(softmax, targets, rows)
        ctx.smoothing = smoothing
        n_correct = (target_logits >= top.squeeze(-1)).sum()
        ctx.mark_non_differentiable(n_correct)
        return per_row.sum(), n_correct

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, _: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        # The saved softmax becomes the gradient in place: backward runs once per step (no retain_graph).
        softmax, targets, rows = ctx.saved_tensors
        gradient = softmax
        gradient[rows, targets] -= 1 - ctx.smoothing
        if ctx.smoothing:
            gradient.sub_(ctx.smoothing / gradient.shape[-1])
        return gradient.mul_(grad), None, None
