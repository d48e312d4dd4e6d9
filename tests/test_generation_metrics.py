"""Generation metrics on hand-made strings (numbers worked out by hand), the choice of prompts, and
greedy generation on the built-in tiny model: batched with left padding, cut at EOS and at the limit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.ml.generation_metrics import (
    MAX_NEW_TOKENS,
    GenerationCase,
    corpus_scores,
    exact_match,
    generate_replies,
    generation_cases,
    new_token_limit,
    rouge_l,
    row_scores,
)
from shared.ml.threads import small_model_threads


def test_exact_match_ignores_whitespace_runs_but_not_case_or_punctuation() -> None:
    assert exact_match("Hello,  world\n", " Hello, world")
    assert not exact_match("hello, world", "Hello, world")
    assert not exact_match("Hello world", "Hello, world")


def test_rouge_l_is_the_f1_of_the_longest_common_word_subsequence() -> None:
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is "the cat on the mat": 5 of 6 words each.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # 2 of 2 predicted words match (precision 1), 2 of 6 reference words (recall 1/3): F1 = 0.5.
    assert rouge_l("the cat", "the cat sat on the mat") == pytest.approx(0.5)


def test_rouge_l_scores_words_in_any_script_lowercased() -> None:
    # rouge-score's default tokenizer keeps only [a-z0-9] and would score this 0.
    assert rouge_l("Привет, мир!", "привет мир") == 1.0
    assert rouge_l("Grüße", "grüsse") == 0.0


def test_corpus_bleu_pools_ngram_counts_over_replies() -> None:
    scores = corpus_scores(["the cat sat on the mat", "xyz"], ["the cat sat on the mat", "abc"])
    # Unigrams: 6 of 7 match; the 5 bigrams, 4 trigrams and 3 four-grams all come from the exact reply;
    # hypothesis and reference lengths are equal, so no brevity penalty: BLEU = (6/7)^(1/4).
    assert scores is not None
    assert scores["bleu"] == pytest.approx(100 * (6 / 7) ** 0.25)
    assert scores["exact_match"] == 0.5
    assert scores["rouge_l"] == 0.5


def test_chrf_averages_character_ngram_precision_and_recall_over_orders() -> None:
    # "abc" vs "abd": characters 2/3 match, bigrams 1/2, trigrams 0/1 (no longer n-grams): precision and
    # recall both average (2/3 + 1/2 + 0) / 3 = 7/18, so chrF (β = 2) is 7/18 too.
    scores = corpus_scores(["abc"], ["abd"])
    assert scores is not None
    assert scores["chrf"] == pytest.approx(100 * 7 / 18)
    assert scores["bleu"] == 0.0


def test_identical_replies_score_perfectly_and_an_empty_set_has_no_scores() -> None:
    assert corpus_scores(["Yes, it is."], [" Yes,  it is. "]) == pytest.approx(
        {"exact_match": 1.0, "rouge_l": 1.0, "bleu": 100.0, "chrf": 100.0}
    )
    assert corpus_scores([], []) is None


def test_row_scores_give_each_reply_its_own_numbers() -> None:
    scores = row_scores("the cat", "the cat sat on the mat")
    assert scores["exact_match"] == 0.0
    assert scores["rouge_l"] == pytest.approx(0.5)
    assert 0 < scores["chrf"] < 100 and 0 < scores["bleu"] < 100


def test_generation_cases_take_the_first_rows_whose_last_reply_is_trained_text() -> None:
    user = {"role": "user", "content": "Q"}
    conversations = [
        [user, {"role": "assistant", "content": "A0"}],
        [user, {"role": "assistant", "content": "A1", "weight": 0}],  # not to be learned: no target
        [user, {"role": "assistant", "content": None, "tool_calls": [{"id": "t"}]}],  # no text
        [user, {"role": "assistant", "content": "first"}, user, {"role": "assistant", "content": "A3"}],
        [user, {"role": "assistant", "content": "A4"}],
    ]
    cases = generation_cases(conversations, limit=2)
    assert [case.index for case in cases] == [0, 3]
    assert cases[1].reference == "A3"
    assert cases[1].prompt == conversations[3][:3]
    assert [case.index for case in generation_cases(conversations, limit=64)] == [0, 3, 4]
    assert generation_cases(conversations, limit=0) == []


def test_a_reply_may_run_past_its_reference_by_a_margin_up_to_a_cap() -> None:
    assert new_token_limit(10) == 26  # at least 16 tokens of margin
    assert new_token_limit(100) == 150  # or half the reference
    assert new_token_limit(5000) == MAX_NEW_TOKENS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, object, set[int]]:
    from transformers import AutoTokenizer

    from shared.ml.builtin_models import build_tiny_chat_model
    from shared.ml.model_loading import generation_eos_ids, load_causal_lm

    directory = build_tiny_chat_model(Path(tmp_path_factory.mktemp("models")) / "tiny", arch="llama")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = load_causal_lm(directory, trust_remote_code=False, dtype=torch.float32)
    return model, tokenizer, generation_eos_ids(directory, tokenizer, trust_remote_code=False)


def _cases(*questions: str) -> list[GenerationCase]:
    return [
        GenerationCase(i, [{"role": "user", "content": q}], "Fine, thanks.") for i, q in enumerate(questions)
    ]


def test_batched_generation_with_left_padding_matches_one_prompt_at_a_time(tiny) -> None:
    model, tokenizer, eos = tiny
    cases = _cases("Hi", "How are you today, my friend?", "Tell me something about the weather.")
    kwargs = {"eos_token_ids": eos, "pad_token_id": tokenizer.pad_token_id, "max_prompt_tokens": 512}
    batched = generate_replies(model, tokenizer, cases, batch_size=3, **kwargs)
    alone = [generate_replies(model, tokenizer, [case], batch_size=1, **kwargs)[0] for case in cases]
    assert batched == alone
    assert all(batched)  # the random model never says EOS here: every reply has text


def test_replies_stop_at_eos_and_at_their_token_limit(tiny) -> None:
    model, tokenizer, eos = tiny
    # With the final norm zeroed every logit is 0, so greedy decoding picks token 0 at every step.
    silenced = type(model)(model.config)
    silenced.load_state_dict(model.state_dict())
    with torch.no_grad():
        silenced.model.norm.weight.zero_()
    cases = _cases("Hi")  # reference "Fine, thanks." is 13 byte tokens: the limit is 13 + 16
    kwargs = {"pad_token_id": tokenizer.pad_token_id, "max_prompt_tokens": 512}
    assert generate_replies(silenced, tokenizer, cases, eos_token_ids={0}, **kwargs) == [""]
    (reply,) = generate_replies(silenced, tokenizer, cases, eos_token_ids=eos, **kwargs)
    assert reply == "\x00" * new_token_limit(13)


def test_a_batch_stops_once_each_reply_has_its_own_limit_and_no_reply_exceeds_it(tiny) -> None:
    model, tokenizer, _ = tiny
    silenced = type(model)(model.config)  # every logit 0: greedy says token 0 forever, never EOS here
    silenced.load_state_dict(model.state_dict())
    with torch.no_grad():
        silenced.model.norm.weight.zero_()
    references = ["ok", "Fine, thanks.", "x" * 40]  # 2, 13 and 40 byte tokens: limits 18, 29 and 60
    cases = [GenerationCase(i, [{"role": "user", "content": "Hi"}], r) for i, r in enumerate(references)]
    forward_passes = []
    hook = silenced.register_forward_pre_hook(lambda module, args: forward_passes.append(1))
    try:
        replies = generate_replies(
            silenced, tokenizer, cases, eos_token_ids={1}, pad_token_id=tokenizer.pad_token_id,
            max_prompt_tokens=512, batch_size=3,
        )  # fmt: skip
    finally:
        hook.remove()
    assert [len(reply) for reply in replies] == [new_token_limit(len(r)) for r in references]
    assert len(forward_passes) == new_token_limit(40)  # the longest limit, not MAX_NEW_TOKENS


def test_bounded_generation_equals_unbounded_generation_where_the_reference_is_long_enough(tiny) -> None:
    model, tokenizer, _ = tiny
    from shared.ml.chat_data import render_generation_prompt

    prompt = [{"role": "user", "content": "Hi"}]
    ids = torch.tensor(
        [tokenizer.encode(render_generation_prompt(tokenizer, prompt), add_special_tokens=False)]
    )

    def unbounded(eos: int, max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
        """Plain transformers greedy decoding, by default with the whole MAX_NEW_TOKENS budget, cut at EOS."""
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        )[0, ids.shape[1] :].tolist()  # fmt: skip
        return out[: out.index(eos)] if eos in out else out

    # An "EOS" the model first says late: the token whose first appearance among its first 40 is last.
    probe = unbounded(tokenizer.pad_token_id, max_new_tokens=40)
    eos = max(set(probe), key=probe.index)
    full = unbounded(eos)
    assert 20 < len(full) < 40

    def bounded(reference: str) -> str:
        case = GenerationCase(0, prompt, reference)
        kwargs = {"eos_token_ids": {eos}, "pad_token_id": tokenizer.pad_token_id, "max_prompt_tokens": 512}
        return generate_replies(model, tokenizer, [case], **kwargs)[0]

    def text(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True).strip()

    assert bounded("x" * 30) == text(full)  # limit 46: the reply ends at EOS first
    assert bounded("x" * 4) == text(full[: new_token_limit(4)])  # limit 20: cut there


def test_a_small_model_on_cpu_is_scored_with_one_thread_and_the_setting_is_restored_after(tiny) -> None:
    model = tiny[0]
    before = torch.get_num_threads()
    with small_model_threads(model):
        inside = torch.get_num_threads()
    assert (inside, torch.get_num_threads()) == (1, before)
