"""What a model actually says: greedy replies to held-out prompts, scored against the reference replies.

Loss and token accuracy judge the reference token by token under teacher forcing; they can improve while
the replies a user would see do not. So the evaluator also generates each sampled conversation's last
assistant reply, with greedy decoding (deterministic, no sampling settings to argue about), and scores it:

- `exact_match`: the share of replies equal to the reference once whitespace runs are collapsed;
- `rouge_l`: the mean ROUGE-L F1 (rouge-score's longest common subsequence of words). Words are runs of
  Unicode letters and digits, lowercased: for ASCII text exactly rouge-score's default tokenizer, which
  would drop every non-ASCII letter and score text in most languages as empty;
- `bleu` and `chrf`: sacrebleu's corpus BLEU (13a tokenization) and chrF (character 6-grams, β = 2),
  on sacrebleu's 0–100 scale so they compare with published numbers. chrF is the main metric: it needs
  no word segmentation and stays informative on short replies, where BLEU's 4-grams are often all zero.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import sacrebleu
import torch
from rouge_score import rouge_scorer
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from shared.ml.chat_data import Messages, render_generation_prompt

GENERATION_METRICS: tuple[str, ...] = ("exact_match", "rouge_l", "bleu", "chrf")
MAIN_METRIC = "chrf"
METRIC_NAMES = {"exact_match": "exact match", "rouge_l": "ROUGE-L", "bleu": "BLEU", "chrf": "chrF"}

MAX_NEW_TOKENS = 512  # the cap on any reply's length, whatever the reference's
MIN_MARGIN_TOKENS = 16  # a reply may run this much (or half the reference, if more) past the reference
NEW_TOKEN_RULE = (
    f"each reply stops at EOS or at min({MAX_NEW_TOKENS}, r + max({MIN_MARGIN_TOKENS}, r // 2)) new tokens, "
    "r being its reference reply's length in tokens"
)


@dataclass(frozen=True)
class GenerationCase:
    """One prompt to answer: a validation conversation up to its last assistant reply, and that reply."""

    index: int  # the conversation's position in the validation data
    prompt: Messages
    reference: str


def generation_cases(conversations: Sequence[Messages], limit: int) -> list[GenerationCase]:
    """The first `limit` conversations (in file order, so every run picks the same) whose last assistant
    message is a trained text reply (not `"weight": 0`, not tool calls without content)."""
    cases: list[GenerationCase] = []
    for index, messages in enumerate(conversations):
        if len(cases) >= limit:
            break
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None or last == 0:
            continue
        reply = messages[last]
        if reply.get("weight", 1) == 0 or not isinstance(reply.get("content"), str):
            continue
        if not reply["content"].strip():
            continue
        cases.append(GenerationCase(index, messages[:last], reply["content"]))
    return cases


def new_token_limit(reference_tokens: int) -> int:
    """How long a reply may grow: the reference's length plus a margin, at most MAX_NEW_TOKENS."""
    return min(MAX_NEW_TOKENS, reference_tokens + max(MIN_MARGIN_TOKENS, reference_tokens // 2))


def generate_replies(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[GenerationCase],
    *,
    eos_token_ids: Collection[int],
    pad_token_id: int,
    max_prompt_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy replies to each case's prompt, rendered with the tokenizer's chat template and its
    generation prompt, in the order of `cases`.

    Prompts are batched longest first (similar lengths together: little padding) and left-padded
    (generation continues every row from its last token); a prompt longer than `max_prompt_tokens` keeps
    its end, where the question is. Each reply stops at the first of `eos_token_ids` or at
    `new_token_limit` of its reference's length, and a batch stops once every reply has (NEW_TOKEN_RULE).
    Runs in eval mode without gradients and restores the model's previous mode.
    """
    prompts = [
        tokenizer.encode(render_generation_prompt(tokenizer, case.prompt), add_special_tokens=False)[
            -max_prompt_tokens:
        ]
        for case in cases
    ]
    limits = [new_token_limit(len(tokenizer.encode(c.reference, add_special_tokens=False))) for c in cases]
    order = sorted(range(len(cases)), key=lambda i: len(prompts[i]), reverse=True)
    stop = set(eos_token_ids)
    device = next(model.parameters()).device
    replies = [""] * len(cases)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = max(len(prompts[i]) for i in rows)
                input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                for row, i in enumerate(rows):
                    input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                    attention_mask[row, width - len(prompts[i]) :] = 1
                row_limits = torch.tensor([limits[i] for i in rows], device=device)
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=_greedy(max(limits[i] for i in rows), stop, pad_token_id),
                    stopping_criteria=StoppingCriteriaList([_RowLimits(width, row_limits)]),
                )
                for row, i in enumerate(rows):
                    # Rows that finish early are padded; each row is cut at its own limit and first EOS.
                    new = output[row, width:].tolist()[: limits[i]]
                    end = next((j for j, token in enumerate(new) if token in stop), len(new))
                    replies[i] = tokenizer.decode(new[:end], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return replies


class _RowLimits(StoppingCriteria):
    """Marks each row finished once it has its own number of new tokens: a batch no longer runs on to
    its longest reference's limit for rows that are done (generate pads finished rows)."""

    def __init__(self, prompt_width: int, limits: torch.Tensor) -> None:
        self.prompt_width = prompt_width
        self.limits = limits

    def __call__(self, input_ids: torch.Tensor, scores: object, **kwargs: object) -> torch.Tensor:
        return (input_ids.shape[1] - self.prompt_width) >= self.limits


def _greedy(max_new_tokens: int, eos_token_ids: Collection[int], pad_token_id: int) -> GenerationConfig:
    """Plain greedy decoding. Every knob a model's generation_config may set that changes the argmax
    path (penalties, n-gram bans) is set to neutral: generate() fills unset fields from the model's."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        temperature=1.0,
        top_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        eos_token_id=sorted(eos_token_ids),
        pad_token_id=pad_token_id,
    )


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Equal once leading, trailing and repeated whitespace is ignored (case and punctuation count)."""
    return normalize_whitespace(prediction) == normalize_whitespace(reference)


class _WordTokenizer:
    """rouge-score's tokenizer interface: lowercased runs of Unicode letters and digits."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"[^\W_]+", text.lower())


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one reply."""
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def row_scores(prediction: str, reference: str) -> dict[str, float]:
    """The scores of one reply: exact match (0 or 1), ROUGE-L F1, and sentence-level BLEU and chrF
    (sacrebleu's, 0–100; sentence BLEU is smoothed and noisy, a guide for reading single rows only)."""
    return {
        "exact_match": float(exact_match(prediction, reference)),
        "rouge_l": rouge_l(prediction, reference),
        "bleu": sacrebleu.sentence_bleu(prediction, [reference]).score,
        "chrf": sacrebleu.sentence_chrf(prediction, [reference]).score,
    }


def corpus_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float] | None:
    """The generation metrics of a set of replies (None for an empty set): exact match and ROUGE-L are
    means over replies; BLEU and chrF are corpus-level (statistics summed over replies, then scored)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return None
    n = len(predictions)
    return {
        "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / n,
        "rouge_l": sum(rouge_l(p, r) for p, r in zip(predictions, references, strict=True)) / n,
        "bleu": sacrebleu.corpus_bleu(list(predictions), [list(references)]).score,
        "chrf": sacrebleu.corpus_chrf(list(predictions), [list(references)]).score,
    }
