"""Odds ratio preference optimisation (ORPO, Hong et al. 2024) of a causal LM with LoRA on preference pairs.

ORPO is supervised fine-tuning with a penalty on the rejected reply, in one stage from the base model and
without a reference model: no second forward pass, no frozen copy. The loss of a micro-batch, as TRL's
`ORPOTrainer` computes it (`get_batch_loss_metrics`):

    loss = NLL − beta × mean over pairs of log σ(log odds(chosen) − log odds(rejected))

- NLL: the chosen replies' negative log-likelihood, a mean per token over the micro-batch's chosen replies
  (the SFT loss of the chosen sides). Over the reply tokens only, as Tunery's SFT trains and as the paper's
  L_SFT (the NLL of y given x) reads; TRL 1.16 also counts the prompt's tokens (the official code's default,
  which has a `disable_prompt_loss` switch).
- log odds(y) = log p − log(1 − p), with p the reply's mean per-token probability (exp of its mean
  log-probability), so a long reply is not penalised for its length.
- beta: the paper's λ (TRL calls it beta, default 0.1), the weight of the odds-ratio term.

The driver sums micro-batch losses per pair: each micro-batch contributes its pairs × its loss, so a step's
loss is the pair-weighted mean of its micro-batches' ORPO losses (TRL's for a window of one micro-batch).

Each step reports the ORPO loss as train_loss, the share of pairs whose chosen reply has the higher mean
log-probability (TRL's rewards/accuracies; chosen log odds above rejected) as train_accuracy, and the two
terms as train_nll_loss and train_log_odds_ratio (the mean log σ(·), TRL's `log_odds_ratio`). Each epoch ends
with `evaluate_orpo` on the validation pairs, and early stopping reads its ORPO loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from services.trainer.causal_lm import chat_data, lora_causal_lm
from services.trainer.driver import (
    Loss,
    Recipe,
    TrainConfig,
    TrainingHooks,
    TrainResult,
    drive,
    save_adapter,
    setup,
)
from shared.data.formats import Example
from shared.methods import method
from shared.ml.preference_data import collate_pairs, iter_preference_batches, tokenize_preferences
from shared.ml.preference_metrics import pair_logps, summary


@dataclass
class ORPOConfig(TrainConfig):
    train_examples: list[Example]  # kind "preference": prompt messages, chosen, rejected
    valid_examples: list[Example] | None
    # batch_size: pairs per micro-batch (each forward pass holds twice as many sequences);
    # max_seq_length: per side (prompt + one reply).
    beta: float = 0.1  # λ: the weight of the odds-ratio term against the chosen replies' NLL


def train_orpo(config: ORPOConfig, hooks: TrainingHooks) -> TrainResult:
    """Train a LoRA adapter on preference pairs; save `adapter/` and `tokenizer/` under output_dir unless
    stopped without "save" or run as a max_steps trial."""
    accelerator = setup(config)

    # Data checks before loading the weights: the stop token, then every pair.
    data = chat_data(config, tokenize_preferences)
    model = lora_causal_lm(config, accelerator)

    def validate(model: torch.nn.Module) -> dict[str, Any]:
        return evaluate_orpo(
            model, iter_preference_batches(data.valid, config.batch_size, data.pad_id), config.beta
        )

    recipe = Recipe(
        model=model,
        train=data.train,
        collate=partial(collate_pairs, pad_token_id=data.pad_id),
        loss=partial(orpo_loss, beta=config.beta),
        validate=validate if data.valid else None,
        validation_metrics=method("orpo").validation_metrics,
        save=partial(save_adapter, tokenizer=data.tokenizer, output_dir=config.output_dir),
        summary=summary,
        warnings=data.warnings,
    )
    return drive(recipe, config, hooks, accelerator)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, without cancellation on either side of −log 2 (Mächler 2012; TRL's)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds_ratio(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """Per pair: log σ(log odds(chosen) − log odds(rejected)), from mean per-token log-probabilities (fp32).
    At most 0; −log 2 when both replies are equally likely."""
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    return F.logsigmoid(log_odds)


@dataclass
class PairScores:
    """A `collate_pairs` batch scored by the model: what the ORPO loss and its figures are made of."""

    chosen_logps: torch.Tensor  # per pair: the chosen reply's mean log-probability per token
    rejected_logps: torch.Tensor
    chosen_nll: torch.Tensor  # the chosen replies' summed negative log-likelihood (all pairs)
    chosen_tokens: torch.Tensor  # the chosen replies' tokens (all pairs)


def score_pairs(model: torch.nn.Module, batch: Mapping[str, Any]) -> PairScores:
    """One forward pass over both sides of every pair (`pair_logps`)."""
    sums, counts = pair_logps(model, batch)
    chosen_sums, rejected_sums = sums.chunk(2)
    chosen_counts, rejected_counts = counts.chunk(2)
    return PairScores(
        chosen_sums / chosen_counts, rejected_sums / rejected_counts, -chosen_sums.sum(), chosen_counts.sum()
    )


def orpo_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], beta: float) -> Loss:
    """The ORPO loss of one micro-batch of pairs, times its pairs (the driver's unit), with its terms."""
    scores = score_pairs(model, batch)
    nll = scores.chosen_nll / scores.chosen_tokens
    ratios = log_odds_ratio(scores.chosen_logps, scores.rejected_logps)
    n_pairs = torch.tensor(len(ratios), device=ratios.device)
    return Loss(
        n_pairs * nll - beta * ratios.sum(), n_pairs,
        (scores.chosen_logps > scores.rejected_logps).sum(), n_pairs, batch["attention_mask"].sum(),
        extras={"train_nll_loss": (n_pairs * nll).detach(), "train_log_odds_ratio": ratios.sum().detach()},
    )  # fmt: skip


def evaluate_orpo(
    model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], beta: float
) -> dict[str, Any]:
    """ORPO's figures on held-out pairs (`iter_preference_batches` batches): {n_pairs, loss (nll_loss −
    beta × log_odds_ratio), nll_loss (per chosen-reply token over all pairs, as SFT validates),
    log_odds_ratio (mean per pair), preference_accuracy (as `evaluate_preferences` reports it)}. Runs in
    eval mode without gradients and restores the model's mode."""
    was_training = model.training
    model.eval()
    nll = tokens = ratios = wins = 0.0
    n_pairs = 0
    try:
        with torch.no_grad():
            for batch in batches:
                scores = score_pairs(model, batch)
                nll += float(scores.chosen_nll)
                tokens += float(scores.chosen_tokens)
                ratios += float(log_odds_ratio(scores.chosen_logps, scores.rejected_logps).double().sum())
                wins += float((scores.chosen_logps > scores.rejected_logps).sum())
                n_pairs += len(scores.chosen_logps)
    finally:
        model.train(was_training)
    if not n_pairs:
        raise ValueError("no preference pairs to evaluate on")
    nll_loss, mean_ratio = nll / tokens, ratios / n_pairs
    return {
        "n_pairs": n_pairs,
        "loss": nll_loss - beta * mean_ratio,
        "nll_loss": nll_loss,
        "log_odds_ratio": mean_ratio,
        "preference_accuracy": wins / n_pairs,
    }
