"""The DPO recipe on a tiny model: the loss is DPO's, it learns preferences that carry over to held-out
pairs, it stops on request and saves an adapter the evaluator scores the same way."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.trainer.driver import StepMetrics
from services.trainer.recipes.dpo import DPOConfig, train_dpo
from shared.data.formats import Example
from shared.ml.builtin_models import build_tiny_chat_model
from shared.ml.preference_data import iter_preference_batches, read_preference_examples, tokenize_preferences
from shared.ml.preference_metrics import dpo_loss, evaluate_preferences, sequence_logps

DPO_DEMO = Path(__file__).parent / "fixtures" / "datasets" / "dpo_en_demo_300.json"  # LLaMA-Factory's demo
LOG_2 = math.log(2)


def sum_pair(a: int, b: int, **fields: Any) -> Example:
    return Example(
        kind="preference",
        source=f"line {a * 10 + b}",
        messages=[{"role": "user", "content": f"What is {a}+{b}?"}],
        chosen=[{"role": "assistant", "content": f"{a + b}"}],
        rejected=[{"role": "assistant", "content": f"I think it is {a + b + 1}, or maybe not."}],
        fields=dict(fields),
    )


PAIRS = [sum_pair(a, b) for a in range(1, 5) for b in range(1, 5)]  # 16: 12 to train, 4 to validate


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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[int]:
    """One torch thread (what a loaded two-core machine runs fastest), restored after."""
    threads = torch.get_num_threads()
    yield 1
    torch.set_num_threads(threads)


def make_config(model_dir: Path, output_dir: Path, **overrides: Any) -> DPOConfig:
    config = DPOConfig(
        model_dir=model_dir,
        output_dir=output_dir,
        train_examples=PAIRS[:12],
        valid_examples=PAIRS[12:],
        n_epochs=2,
        batch_size=4,
        learning_rate=1e-2,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=None,
        max_seq_length=64,
        seed=0,
        torch_threads=1,
    )
    return replace(config, **overrides)


# -- the loss ---------------------------------------------------------------------------------------------


def test_the_dpo_loss_is_log_2_when_policy_and_reference_agree() -> None:
    logps = torch.tensor([-12.0, -3.5, -40.0])

    losses, chosen_rewards, rejected_rewards = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)

    assert losses.tolist() == pytest.approx([LOG_2] * 3)
    assert chosen_rewards.tolist() == rejected_rewards.tolist() == [0.0, 0.0, 0.0]


def test_the_dpo_loss_falls_as_the_policy_favours_the_chosen_reply_more_than_the_reference_does() -> None:
    # Policy: chosen up by 2 nats, rejected down by 3 against the reference; beta 0.5 → margin 2.5.
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        torch.tensor([-8.0]), torch.tensor([-13.0]), torch.tensor([-10.0]), torch.tensor([-10.0]), beta=0.5
    )

    assert chosen_rewards.item() == pytest.approx(1.0)
    assert rejected_rewards.item() == pytest.approx(-1.5)
    assert losses.item() == pytest.approx(-F.logsigmoid(torch.tensor(2.5)).item())
    assert losses.item() < LOG_2


def test_label_smoothing_charges_a_confident_margin_as_possibly_mislabelled() -> None:
    margin_args = (torch.tensor([-8.0]), torch.tensor([-13.0]), torch.tensor([-10.0]), torch.tensor([-10.0]))

    plain, _, _ = dpo_loss(*margin_args, beta=0.5)
    smoothed, _, _ = dpo_loss(*margin_args, beta=0.5, label_smoothing=0.1)

    h = torch.tensor(2.5)
    assert smoothed.item() == pytest.approx((-0.9 * F.logsigmoid(h) - 0.1 * F.logsigmoid(-h)).item())
    assert smoothed.item() > plain.item()


def test_sequence_logps_sum_the_log_probabilities_of_the_labelled_tokens_only() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])

    sums, counts = sequence_logps(logits, labels)

    log_probs = logits.log_softmax(dim=-1)
    expected = [
        log_probs[0, 1, 3] + log_probs[0, 2, 4],
        sum(log_probs[1, t - 1, labels[1, t]] for t in range(1, 5)),
    ]
    assert sums.tolist() == pytest.approx([float(e) for e in expected], rel=1e-5)
    assert counts.tolist() == [2, 4]


# -- the recipe -------------------------------------------------------------------------------------------


def test_the_first_step_reports_log_2_and_no_reward_accuracy(
    model_dir: Path, tmp_path: Path, one_thread
) -> None:
    """LoRA starts as a no-op, so before the first update the policy is its reference: the loss is log 2,
    every implicit reward 0, and no pair is won."""
    hooks = RecordingHooks()

    train_dpo(make_config(model_dir, tmp_path, max_steps=1), hooks)

    assert hooks.steps[0].train_loss == pytest.approx(LOG_2, abs=1e-6)
    assert hooks.steps[0].train_accuracy == 0.0
    assert hooks.steps[0].grad_norm > 0


def test_training_reports_each_step_and_validates_each_epoch_then_saves_adapter_and_tokenizer(
    model_dir: Path, tmp_path: Path, one_thread
) -> None:
    hooks = RecordingHooks()

    result = train_dpo(make_config(model_dir, tmp_path), hooks)

    assert [m.step for m in hooks.steps] == [1, 2, 3, 4, 5, 6] and result.total_steps == 6  # 12 pairs / 4 × 2
    assert result.stopped is None
    assert [epoch for epoch, _ in hooks.epochs] == [1, 2]
    final = hooks.epochs[-1][1]
    assert final is not None and final["n_pairs"] == 4
    assert result.metrics_rows[-1]["valid_loss"] == final["loss"]
    assert result.metrics_rows[-1]["valid_reward_accuracy"] == final["reward_accuracy"]
    assert result.trained_tokens == hooks.steps[-1].trained_tokens > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "tokenizer"]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_the_saved_adapter_scores_the_validation_pairs_as_training_reported(
    model_dir: Path, tmp_path: Path, one_thread
) -> None:
    hooks = RecordingHooks()
    train_dpo(make_config(model_dir, tmp_path), hooks)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter")
    pairs, _ = tokenize_preferences(tokenizer, PAIRS[12:], 64)
    report = evaluate_preferences(model, iter_preference_batches(pairs, 3, tokenizer.pad_token_id), beta=0.1)

    final = hooks.epochs[-1][1]
    assert final is not None
    for name in ("loss", "reward_accuracy", "reward_margin", "preference_accuracy"):
        assert report[name] == pytest.approx(final[name], abs=1e-5)


def test_grad_accumulation_gives_the_gradient_of_the_full_batch(
    model_dir: Path, tmp_path: Path, one_thread
) -> None:
    """Two micro-batches of one pair must weight each pair like one batch of two: a mean per pair."""
    one_step = {"train_examples": PAIRS[:2], "valid_examples": None, "n_epochs": 1, "max_steps": 1}
    config = make_config(model_dir, tmp_path, **one_step)
    accumulated, full = RecordingHooks(), RecordingHooks()

    # Policy == reference on the first step, so compare the gradient: the train loss is log 2 either way.
    train_dpo(replace(config, batch_size=1, gradient_accumulation_steps=2), accumulated)
    train_dpo(replace(config, batch_size=2, gradient_accumulation_steps=1), full)

    rel = 2e-2 if torch.cuda.is_available() else 1e-5
    assert accumulated.steps[0].grad_norm == pytest.approx(full.steps[0].grad_norm, rel=rel)
    assert accumulated.steps[0].grad_norm > 0


def test_a_discarding_stop_ends_training_after_that_step_without_saving(
    model_dir: Path, tmp_path: Path, one_thread
) -> None:
    hooks = RecordingHooks(stop_after=2)

    result = train_dpo(make_config(model_dir, tmp_path / "out"), hooks)

    assert (result.stopped, result.steps_completed) == ("discard", 2)
    assert hooks.epochs == []
    assert not (tmp_path / "out").exists()


def test_a_saving_stop_keeps_the_adapter_trained_so_far(model_dir: Path, tmp_path: Path, one_thread) -> None:
    result = train_dpo(make_config(model_dir, tmp_path / "out"), RecordingHooks(stop_after=2, action="save"))

    assert (result.stopped, result.steps_completed) == ("save", 2)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_a_learning_rate_trial_returns_validation_metrics_and_saves_nothing(
    model_dir: Path, tmp_path: Path, one_thread
) -> None:
    result = train_dpo(make_config(model_dir, tmp_path / "out", max_steps=2), RecordingHooks())

    assert result.steps_completed == 2
    assert result.trial_valid is not None and result.trial_valid["n_pairs"] == 4
    assert result.trial_valid["loss"] > 0
    assert not (tmp_path / "out").exists()


def test_a_label_smoothing_of_one_half_or_more_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        train_dpo(make_config(tmp_path / "no-model", tmp_path, label_smoothing=0.5), RecordingHooks())


# -- the metrics ------------------------------------------------------------------------------------------


def test_the_untuned_model_has_no_reward_margin_and_ranks_like_its_reference(model_dir: Path) -> None:
    """A fresh adapter changes nothing: loss log 2, zero rewards; its own ranking is the base's."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    pairs, _ = tokenize_preferences(tokenizer, PAIRS, 64)
    batches = lambda: iter_preference_batches(pairs, 5, tokenizer.pad_token_id)  # noqa: E731

    base_alone = evaluate_preferences(base, batches(), beta=0.1, reference=None)
    untuned = evaluate_preferences(
        get_peft_model(base, LoraConfig(target_modules="all-linear")), batches(), 0.1
    )

    assert sorted(base_alone) == ["by_group", "logp_margin", "n_pairs", "preference_accuracy"]
    assert untuned["loss"] == pytest.approx(LOG_2)
    assert (untuned["reward_accuracy"], untuned["reward_margin"]) == (0.0, 0.0)
    assert untuned["preference_accuracy"] == untuned["reference_preference_accuracy"]
    assert untuned["preference_accuracy"] == base_alone["preference_accuracy"]
    assert untuned["logp_margin"] == pytest.approx(base_alone["logp_margin"])


def test_pairs_with_a_group_are_also_reported_per_group_as_if_scored_alone(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    examples = [
        sum_pair(a, b, group="small" if a + b < 5 else "large") for a in range(1, 4) for b in range(1, 4)
    ]
    examples.append(sum_pair(9, 9))
    pairs, _ = tokenize_preferences(tokenizer, examples, 64)

    def score(chosen: list) -> dict[str, Any]:
        batches = iter_preference_batches(chosen, 4, tokenizer.pad_token_id)
        return evaluate_preferences(model, batches, 0.1, reference=None)

    by_group = score(pairs)["by_group"]
    assert sorted(by_group["groups"]) == ["large", "small"]
    assert by_group["n_without_group"] == 1
    large = score([pair for pair in pairs if pair.group == "large"])
    assert by_group["groups"]["large"]["n_pairs"] == large["n_pairs"] == 3
    assert by_group["groups"]["large"]["logp_margin"] == pytest.approx(large["logp_margin"])
    assert by_group["groups"]["large"]["preference_accuracy"] == large["preference_accuracy"]


# -- learning real preferences ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(model_dir: Path, tmp_path_factory: pytest.TempPathFactory, one_thread) -> dict[str, Any]:
    """DPO on 200 pairs of LLaMA-Factory's demo preference data; every third pair is held out (100).

    Pairs are cut to 128 tokens (bytes, for this tokenizer): the replies keep at least their first 64,
    where the style that separates chosen from rejected replies in this data shows most ("Sure, I'd be
    happy to help!" opens 37 rejected replies and 7 chosen ones). A random 2-layer model can learn only
    such surface features, so the held-out gains are modest, while the training pairs are learned well.
    """
    examples = read_preference_examples(DPO_DEMO, DPO_DEMO.name)
    train = [e for i, e in enumerate(examples) if i % 3 != 2]
    held_out = [e for i, e in enumerate(examples) if i % 3 == 2]
    output_dir = tmp_path_factory.mktemp("dpo-demo")
    config = replace(
        make_config(model_dir, output_dir), train_examples=train, valid_examples=held_out, n_epochs=3,
        batch_size=8, learning_rate=3e-3, max_seq_length=128,
    )  # fmt: skip
    hooks = RecordingHooks()
    result = train_dpo(config, hooks)

    tokenizer = AutoTokenizer.from_pretrained(output_dir / "tokenizer")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), output_dir / "adapter")
    seen, _ = tokenize_preferences(tokenizer, train[:50], 128)
    on_train = evaluate_preferences(model, iter_preference_batches(seen, 16, tokenizer.pad_token_id), 0.1)
    return {"result": result, "hooks": hooks, "held_out": result.valid_report, "train": on_train}


def test_dpo_beats_the_base_model_on_held_out_preference_pairs(demo_run: dict[str, Any]) -> None:
    # This run (seed 0): held-out DPO loss 0.633, reward accuracy 0.62, preference accuracy 0.62 against
    # the base's 0.59 (0.658, 0.62, 0.63 against 0.57 while pairs cut to identical sides still counted).
    # Over data-order seeds 0-4 and tiny models built with seeds 0-2 (7 runs, measured while they still
    # counted): loss 0.59-0.66 (the base's is log 2 = 0.693), reward accuracy 0.55-0.65 (the base has no
    # reward: 0; chance is 0.5), preference accuracy 0.03-0.15 above the base's. Modest but in every run.
    held_out = demo_run["held_out"]
    # 3 of the 100 pairs differ only past 128 tokens (the same tokens on both sides once cut): skipped.
    assert held_out["n_pairs"] == 97
    warnings = demo_run["result"].warnings
    assert warnings[2].startswith("Skipped 3 of 100 validation preference pairs (item 60, ")
    assert held_out["loss"] < LOG_2 - 0.02
    assert held_out["reward_accuracy"] >= 0.55
    assert held_out["preference_accuracy"] > held_out["reference_preference_accuracy"]


def test_dpo_learns_the_training_pairs(demo_run: dict[str, Any]) -> None:
    # This run: reward accuracy 0.94, preference accuracy 0.92 against the base's 0.67 on the first 50
    # training pairs (49: one is skipped, the same tokens on both sides once cut; 0.66 for the base on all 50);
    # over the 7 runs above, reward accuracy 0.88-0.96 and preference accuracy 0.20-0.44 above the base's.
    on_train = demo_run["train"]
    assert on_train["reward_accuracy"] >= 0.8
    assert on_train["preference_accuracy"] >= on_train["reference_preference_accuracy"] + 0.15
    losses = [m.train_loss for m in demo_run["hooks"].steps]
    assert sum(losses[-5:]) / 5 < LOG_2 - 0.1
