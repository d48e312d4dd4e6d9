"""OpenAI chat examples → training tensors, shared by the trainer and the evaluator.

Loss is computed only on what the model must generate: each trained assistant message's content and the
end-of-turn token after it. The spans come from the tokenizer's own chat template, rendered one turn at a
time, so masking can never silently drift from what the template produces (the "trains on nothing" bug).
With `train_on_inputs` every token of the conversation is trained instead (system and user turns and the
template's own text too), except the replies marked `"weight": 0`.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from tokenizers import Encoding
from transformers import PreTrainedTokenizerBase

from shared.data import pii
from shared.data.formats import Example, read_examples

IGNORE_INDEX = -100  # label of positions that carry no loss (torch cross_entropy's default ignore_index)

Messages = list[dict[str, Any]]
T = TypeVar("T")

# The rule for examples truncation leaves with nothing to learn: they are skipped with a warning, and a
# dataset fails only when fewer than this share of its examples is left. Past that point the sequence
# length is wrong for the data, and training on the short remainder would quietly learn another task.
MIN_KEPT_FRACTION = 0.5
SOURCES_NAMED = 5  # in messages; the estimate's and the report's `sources` list up to SOURCES_LISTED
SOURCES_LISTED = 20


class DataError(ValueError):
    """The user's examples cannot be trained on as they are."""


class ChatTemplateError(ValueError):
    """The base model's tokenizer or chat template cannot be used for chat fine-tuning."""


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # the token where trained, else IGNORE_INDEX
    truncated: bool

    @property
    def n_trainable(self) -> int:
        """Tokens that carry loss: the first position is never a target (nothing predicts it)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def read_conversations(path: Path, filename: str, *, redact: bool = False) -> list[Messages]:
    """The chat conversations of a dataset in any chat-like format (chat, prompt/completion, alpaca,
    sharegpt), converted by shared.data.formats; `filename` (the uploaded name) tells its container.

    With `redact`, personal data and secrets in every message are replaced by `[REDACTED:<kind>]`
    (a job's `data_policy: redact`): the model never sees them.
    """
    return [example.messages or [] for example in read_chat_examples(path, filename, redact=redact)]


def read_chat_examples(path: Path, filename: str, *, redact: bool = False) -> list[Example]:
    """`read_conversations`, each conversation as its Example: with the fields its format does not use
    (e.g. `group`), which the held-out split and the evaluator's per-group figures keep."""
    with open(path, "rb") as f:
        examples = list(read_examples(f, filename=filename))
    if examples and examples[0].kind != "chat":
        raise DataError(f"{filename} holds {examples[0].kind} examples, not chat conversations")
    if redact:
        examples = [
            dataclasses.replace(
                example,
                messages=[
                    {**m, "content": pii.redact(m["content"])} if isinstance(m.get("content"), str) else m
                    for m in example.messages or []
                ],
            )
            for example in examples
        ]
    return examples


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    max_length: int,
    *,
    eos_token_ids: Collection[int] | None = None,
    train_on_inputs: bool = False,
) -> TokenizedExample:
    """Token ids and labels for one conversation, truncated to `max_length` tokens.

    Labels cover every assistant message not marked `"weight": 0`, from its first content token through
    its end-of-turn token (the last of `eos_token_ids` in its turn, default the tokenizer's EOS); what the
    template puts after that token (e.g. ChatML's newline) is never generated, so it is not trained.

    `train_on_inputs`: label every token instead (system, user and tool turns, the template's markup),
    except the content and end-of-turn token of assistant messages marked `"weight": 0`, which stay
    untrained: weight 0 says "do not learn this reply", whoever wrote the prompt.
    """
    return _tokenize(tokenizer, [messages], max_length, eos_token_ids, train_on_inputs, lambda _, exc: exc)[0]


def tokenize_dataset(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Messages],
    max_length: int,
    *,
    eos_token_ids: Collection[int] | None = None,
    dataset: str = "training",
    train_on_inputs: bool = False,
    sources: Sequence[str] | None = None,
) -> tuple[list[TokenizedExample], list[str]]:
    """`tokenize_all`, then `keep_trainable`: the examples to train on and warnings about the others."""
    examples = tokenize_all(
        tokenizer, conversations, max_length, eos_token_ids=eos_token_ids, dataset=dataset,
        train_on_inputs=train_on_inputs, sources=sources,
    )  # fmt: skip
    return keep_trainable(examples, conversations, dataset=dataset, sources=sources)


def tokenize_all(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Messages],
    max_length: int,
    *,
    eos_token_ids: Collection[int] | None = None,
    dataset: str = "training",
    train_on_inputs: bool = False,
    sources: Sequence[str] | None = None,
) -> list[TokenizedExample]:
    """`tokenize_chat` every conversation, one example each (none checked or left out); errors name the
    example. `sources[i]` says where conversation i is in its file (default `line i + 1`)."""

    def named(i: int, exc: DataError) -> DataError:
        return DataError(f"{dataset} example {i} ({_where(sources, i)}): {exc}")

    return _tokenize(tokenizer, conversations, max_length, eos_token_ids, train_on_inputs, named)


def keep_trainable(
    examples: Sequence[TokenizedExample],
    conversations: Sequence[Messages],
    *,
    dataset: str = "training",
    sources: Sequence[str] | None = None,
) -> tuple[list[TokenizedExample], list[str]]:
    """`check_trainable`: the examples left to train on, and warnings about those skipped or truncated."""
    skipped = check_trainable(examples, conversations, dataset=dataset, sources=sources)
    kept = skipped.keep(examples)
    warnings = [skipped.warning()] if skipped.count else []
    truncated = [i for i, example in enumerate(examples) if example.truncated and i not in skipped.indices]
    if truncated:
        first = truncated[0]
        warnings.append(
            f"{len(truncated)} of {len(kept)} {dataset} examples are longer than the maximum sequence "
            f"length ({len(examples[first].input_ids)} tokens) and were truncated, e.g. example {first} "
            f"({_where(sources, first)}); their tails are not trained"
        )
    return kept, warnings


def check_trainable(
    examples: Sequence[TokenizedExample],
    conversations: Sequence[Messages],
    *,
    dataset: str = "training",
    sources: Sequence[str] | None = None,
) -> Skipped:
    """The examples truncation left without a trainable token (`cut_away`), checked against the rule of
    `Skipped.check`; fail on an example without trainable tokens for any other reason.

    Such an example (no assistant reply, every reply of weight 0) would hide a data or masking mistake, so
    it is an error naming the example. `conversations[i]` is the source of `examples[i]`, found in its file
    at `sources[i]` (default `line i + 1`, its line in a JSONL file without blank lines).
    """
    skipped = cut_away(examples, conversations, dataset=dataset, sources=sources)
    skipped.check()
    return skipped


def cut_away(
    examples: Sequence[TokenizedExample],
    conversations: Sequence[Messages],
    *,
    dataset: str = "training",
    sources: Sequence[str] | None = None,
) -> Skipped:
    """`check_trainable` without the threshold: what truncation cut away, for reports that only count it."""
    empty = [i for i, example in enumerate(examples) if example.n_trainable == 0]
    cut = [i for i in empty if _lost_to_truncation(conversations[i], examples[i])]
    broken = [i for i in empty if i not in cut]
    if broken:
        details = [
            f"{dataset} example {i} ({_where(sources, i)}) has no trainable tokens after masking: "
            f"{_why_untrainable(conversations[i])}"
            for i in broken[:SOURCES_NAMED]
        ]
        more = f"; and {len(broken) - SOURCES_NAMED} more" if len(broken) > SOURCES_NAMED else ""
        raise DataError("; ".join(details) + more)
    return Skipped(
        dataset=dataset,
        total=len(examples),
        indices=tuple(cut),
        sources=tuple(_where(sources, i) for i in cut),
        max_length=max((len(examples[i].input_ids) for i in cut), default=0),
    )


@dataclass(frozen=True)
class Skipped:
    """The examples of one dataset that truncation to the maximum sequence length left with nothing to
    learn, which training and validation leave out rather than fail on (see MIN_KEPT_FRACTION)."""

    dataset: str  # "training", "validation": the name messages give the dataset
    total: int  # examples in the dataset
    indices: tuple[int, ...] = ()  # positions of the skipped examples in the dataset
    sources: tuple[str, ...] = ()  # where each is in its file: "line 7", "item 7", "row 7"
    max_length: int = 0  # the maximum sequence length that cut them
    what: str = "examples"
    why: str = "truncation cuts off every trained token of their assistant replies"

    @property
    def count(self) -> int:
        return len(self.indices)

    @property
    def kept(self) -> int:
        return self.total - self.count

    def keep(self, items: Sequence[T]) -> list[T]:
        """`items` (one per example of the dataset) without the skipped examples' items."""
        skipped = set(self.indices)
        return [item for i, item in enumerate(items) if i not in skipped]

    def named(self) -> str:
        """The first skipped examples' places in the file, e.g. "line 3, line 9 and 4 more"."""
        shown = ", ".join(self.sources[:SOURCES_NAMED])
        more = self.count - SOURCES_NAMED
        return shown + (f" and {more} more" if more > 0 else "")

    def warning(self) -> str:
        return (
            f"Skipped {self.count} of {self.total} {self.dataset} {self.what} ({self.named()}): at the "
            f"maximum sequence length ({self.max_length} tokens), {self.why}; they are not trained on"
        )

    def check(self) -> None:
        """Fail when fewer than MIN_KEPT_FRACTION of the dataset's examples are left (none of none is fine:
        an empty dataset is refused where it is read)."""
        if self.count and self.kept < MIN_KEPT_FRACTION * self.total:
            raise DataError(
                f"{self.count} of {self.total} {self.dataset} {self.what} have nothing left to train on at "
                f"the maximum sequence length ({self.max_length} tokens): {self.why} ({self.named()}). "
                f"Only {self.kept} would be left, and at least {MIN_KEPT_FRACTION:.0%} must be; raise "
                "max_seq_length or shorten these examples"
            )

    def summary(self) -> dict[str, Any]:
        """For the estimate and the file report: {count, of, sources (the first SOURCES_LISTED)}."""
        return {"count": self.count, "of": self.total, "sources": list(self.sources[:SOURCES_LISTED])}


def skipped_note(skipped: Sequence[Skipped]) -> str | None:
    """One warning for the examples skipped from every dataset of a job (None when none were)."""
    some = [s for s in skipped if s.count]
    if not some:
        return None
    parts = "; ".join(f"{s.count} of {s.total} {s.dataset} {s.what} ({s.named()})" for s in some)
    count, what = sum(s.count for s in some), some[0].what
    return (
        f"Skipped {count} {what if count > 1 else what.removesuffix('s')} with nothing left to train on at the maximum "
        f"sequence length ({some[0].max_length} tokens): {parts}. {some[0].why.capitalize()}; at least "
        f"{MIN_KEPT_FRACTION:.0%} of each dataset must be left"
    )


def check_eos(tokenizer: PreTrainedTokenizerBase, eos_token_ids: Collection[int] | None = None) -> list[str]:
    """Fail when the chat template ends assistant turns with a token that does not stop generation.

    A model tuned on such a template learns to emit the template's end-of-turn token, which generation does
    not stop on: it "never stops". `eos_token_ids` are the ids generation stops on (the model's
    generation_config); default the tokenizer's EOS. Returns warnings for weaker mismatches.
    """
    stop_ids = set(eos_token_ids) if eos_token_ids is not None else {tokenizer.eos_token_id}
    content = "Tunery EOS probe"
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]
    prompt = _render(tokenizer, conversation[:1], add_generation_prompt=True)
    full = _render(tokenizer, conversation, add_generation_prompt=False)
    at = full.find(content, len(prompt))
    if not full.startswith(prompt) or at < 0:
        raise ChatTemplateError(
            f"{_name(tokenizer)}: the chat template does not render an assistant reply after its own "
            f"generation prompt ({prompt!r} → {full!r}), so assistant turns cannot be located"
        )
    end_of_turn = full[at + len(content) :]
    end_ids = tokenizer.encode(end_of_turn, add_special_tokens=False)
    stop = next((t for t in end_ids if t in stop_ids), None)
    if stop is None:
        raise ChatTemplateError(
            f"{_name(tokenizer)}: the chat template ends assistant turns with {end_of_turn!r}, which "
            f"contains none of the EOS tokens generation stops on ({_tokens(tokenizer, stop_ids)}); a model "
            "tuned on it would never stop generating. Fix the tokenizer's eos_token or the model's "
            "generation_config.eos_token_id"
        )
    if stop != tokenizer.eos_token_id:
        return [
            f"{_name(tokenizer)}: assistant turns end with {_tokens(tokenizer, [stop])}, which "
            f"generation_config stops on, but the tokenizer's eos_token is {tokenizer.eos_token!r}; "
            "servers that stop only on the tokenizer's EOS will not stop"
        ]
    return []


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch; padding gets no attention and no loss."""
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def iter_batches(
    examples: Sequence[TokenizedExample], batch_size: int, pad_token_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Evaluation batches, longest examples first: less padding, and any out-of-memory shows at once."""
    ordered = sorted(examples, key=lambda example: len(example.input_ids), reverse=True)
    for i in range(0, len(ordered), batch_size):
        yield collate(ordered[i : i + batch_size], pad_token_id)


def render_generation_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> str:
    """The prompt a model answers `messages` from: the chat template with its generation prompt, the same
    rendering training masks against (encode it without adding special tokens, as training does)."""
    return _render(tokenizer, messages, add_generation_prompt=True)


@dataclass(frozen=True)
class _Prefix:
    """The rendering of a conversation's first `n_messages` messages, which a trained span starts or ends
    after."""

    n_messages: int
    text: str


def _tokenize(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Messages],
    max_length: int,
    eos_token_ids: Collection[int] | None,
    train_on_inputs: bool,
    named: Callable[[int, DataError], DataError],
) -> list[TokenizedExample]:
    """`tokenize_chat` for many conversations with few calls into the template and the tokenizer: the
    whole texts and then the span prefixes each rendered in one call, every whole text encoded in one
    batched call of the Rust tokenizer (it encodes in parallel), each span placed by that call's token
    offsets, and only the prefixes the offsets cannot place encoded again, in one more batched call.
    `named(i, error)` is the error raised for conversation i."""
    stop_ids = set(eos_token_ids) if eos_token_ids is not None else {tokenizer.eos_token_id}
    texts = _render_all(tokenizer, conversations, [False] * len(conversations))
    spans = _span_prefixes(tokenizer, conversations, texts, train_on_inputs)
    ids, encodings = _encode(tokenizer, texts)
    dropped = _dropped_by(tokenizer) if encodings is not None else None
    lengths = {
        (i, prefix): _split_at(encodings[i], len(prefix.text), texts[i], dropped) if dropped else None
        for i, prefixes in enumerate(spans)
        for span in prefixes
        for prefix in span
        if prefix is not None
    }
    unplaced = [key for key, length in lengths.items() if length is None]
    for (i, prefix), prefix_ids in zip(
        unplaced, _encode(tokenizer, [p.text for _, p in unplaced])[0], strict=True
    ):
        if ids[i][: len(prefix_ids)] != prefix_ids:
            raise named(
                i,
                DataError(
                    f"message {prefix.n_messages} starts with {texts[i][len(prefix.text) :][:12]!r}, which "
                    "the tokenizer merges with the chat template's text before it, so the reply cannot be "
                    "separated from the prompt; remove leading whitespace and line breaks from messages"
                ),
            )
        lengths[i, prefix] = len(prefix_ids)
    examples = []
    for i, (input_ids, prefixes) in enumerate(zip(ids, spans, strict=True)):
        labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * len(input_ids)
        for before, through in prefixes:
            start = lengths[i, before]
            end = len(input_ids) if through is None else lengths[i, through]
            stops = [j for j in range(start, end) if input_ids[j] in stop_ids]
            if stops:
                end = stops[-1] + 1
            labels[start:end] = [IGNORE_INDEX] * (end - start) if train_on_inputs else input_ids[start:end]
        examples.append(
            TokenizedExample(input_ids[:max_length], labels[:max_length], len(input_ids) > max_length)
        )
    return examples


def _span_prefixes(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Messages],
    texts: Sequence[str],
    train_on_inputs: bool,
) -> list[list[tuple[_Prefix, _Prefix | None]]]:
    """For each conversation, each span to label (a trained reply; with `train_on_inputs`, an untrained
    one): the rendering it starts after (the earlier messages with the generation prompt) and the one it
    ends with (None for the last message: its rendering is the whole text), each checked to begin the
    whole text. All the prefixes are rendered in one call."""
    wanted = []  # (conversation, messages before the span's end, with the generation prompt)
    for i, messages in enumerate(conversations):
        for m, message in enumerate(messages):
            if message["role"] != "assistant" or (message.get("weight", 1) == 0) != train_on_inputs:
                continue  # assistant-only: the trained replies; train_on_inputs: the weight-0 replies
            wanted.append((i, m, True))
            if m < len(messages) - 1:
                wanted.append((i, m + 1, False))
    rendered = _render_all(tokenizer, [conversations[i][:n] for i, n, _ in wanted], [g for _, _, g in wanted])
    spans: list[list[tuple[_Prefix, _Prefix | None]]] = [[] for _ in conversations]
    for (i, n, generation_prompt), text in zip(wanted, rendered, strict=True):
        if not texts[i].startswith(text):
            raise ChatTemplateError(
                f"{_name(tokenizer)}: the chat template renders the first {n} messages"
                f"{' with a generation prompt' if generation_prompt else ''} differently once later "
                "messages follow (it rewrites earlier turns), so assistant tokens cannot be located for "
                "loss masking"
            )
        if generation_prompt:
            spans[i].append((_Prefix(n, text), None))
        else:
            spans[i][-1] = (spans[i][-1][0], _Prefix(n, text))
    return spans


def _render_all(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Messages],
    generation_prompts: Sequence[bool],
) -> list[str]:
    """Every conversation rendered, those with and those without the generation prompt each in one call
    of the template (its setup is paid once, not per conversation); when a call fails, one at a time, so
    that the error is the one the failing conversation gets."""
    texts: list[str] = [""] * len(conversations)
    for generation_prompt in (False, True):
        chosen = [i for i, g in enumerate(generation_prompts) if g == generation_prompt]
        batch = [conversations[i] for i in chosen]
        if batch and all(batch):  # the template refuses an empty conversation: rendered alone, it says so
            try:
                rendered = tokenizer.apply_chat_template(
                    batch, tokenize=False, add_generation_prompt=generation_prompt
                )
            except Exception:  # rendered again one at a time below: the failing one raises its own error
                pass
            else:
                for i, text in zip(chosen, rendered, strict=True):
                    texts[i] = text
                continue
        for i in chosen:
            texts[i] = _render(tokenizer, conversations[i], add_generation_prompt=generation_prompt)
    return texts


def _encode(
    tokenizer: PreTrainedTokenizerBase, texts: list[str]
) -> tuple[list[list[int]], list[Encoding] | None]:
    """The texts' token ids, and their encodings (which place each token in the text) where the tokenizer is
    a fast (Rust) one, whose batch is encoded in parallel and read straight from its encodings
    (transformers' conversion of them into Python dicts costs as much as the encoding). The rendered text
    already holds any BOS the template wants; adding special tokens would double it."""
    if not tokenizer.is_fast:
        return [tokenizer.encode(text, add_special_tokens=False) for text in texts], None
    backend = tokenizer.backend_tokenizer
    padding, truncation = backend.padding, backend.truncation
    # A tokenizer.json that pads or truncates (MiniLM's pads to 128): off for this call, as transformers does.
    if padding is not None:
        backend.no_padding()
    if truncation is not None:
        backend.no_truncation()
    try:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
    finally:
        if padding is not None:
            backend.enable_padding(**padding)
        if truncation is not None:
            backend.enable_truncation(**truncation)
    return [e.ids for e in encodings], encodings


def _split_at(encoding: Encoding, boundary: int, text: str, dropped: Callable[[str], bool]) -> int | None:
    """How many tokens render the text's first `boundary` characters, when the tokens split exactly
    there: the characters between the last token before the boundary and the first after it are ones the
    tokenizer drops (`dropped`, e.g. whitespace for WordPiece; usually there are none). None anywhere else
    (a token across the boundary, or offsets trimmed of a space the next token holds): the prefix must
    then be encoded on its own to know. The token at the boundary is asked of the encoding first (in
    Rust); only where no token holds that character are all the offsets read."""
    n = encoding.char_to_token(boundary) if boundary < len(text) else None
    if n is not None:
        if encoding.token_to_chars(n)[0] != boundary:
            return None  # that token starts before the boundary
        last_end = encoding.token_to_chars(n - 1)[1] if n else 0
        return n if last_end == boundary or dropped(text[last_end:boundary]) else None
    offsets = encoding.offsets
    n = bisect.bisect_right([end for _, end in offsets], boundary)
    last_end = offsets[n - 1][1] if n else 0
    next_start = offsets[n][0] if n < len(offsets) else len(text)
    if next_start < boundary or (
        (last_end < boundary or next_start > boundary) and not dropped(text[last_end:next_start])
    ):
        return None
    return n


def _dropped_by(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], bool]:
    """Whether the tokenizer makes no token at all of a string (asked once per distinct string)."""

    @functools.cache
    def dropped(gap: str) -> bool:
        return not gap or not tokenizer.encode(gap, add_special_tokens=False)

    return dropped


def _render(tokenizer: PreTrainedTokenizerBase, messages: Messages, *, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja errors, raise_exception() in templates, a missing template
        raise ChatTemplateError(f"{_name(tokenizer)}: the chat template failed: {exc}") from exc


def _lost_to_truncation(messages: Messages, example: TokenizedExample) -> bool:
    """Truncation, not the data, left the example without trainable tokens: it has a trained reply."""
    return example.truncated and any(m["role"] == "assistant" and m.get("weight", 1) != 0 for m in messages)


def _why_untrainable(messages: Messages) -> str:
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        return "it has no assistant message"
    if all(m.get("weight", 1) == 0 for m in assistants):
        return "every assistant message has weight 0"
    return "the chat template rendered no assistant tokens"


def _where(sources: Sequence[str] | None, i: int) -> str:
    """Where example i is in its file: its source, or line i + 1 (a JSONL file without blank lines)."""
    return sources[i] if sources is not None else f"line {i + 1}"


def _name(tokenizer: PreTrainedTokenizerBase) -> str:
    return f"model {tokenizer.name_or_path or type(tokenizer).__name__}"


def _tokens(tokenizer: PreTrainedTokenizerBase, ids: Collection[int]) -> str:
    return ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} (id {i})" for i in sorted(ids))
