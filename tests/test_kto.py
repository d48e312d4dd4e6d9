"""KTO on unpaired feedback: the loss is TRL's on the same batch, a few steps on a tiny model move the
desirable completions up and the undesirable ones down, bad rows are named, and a job runs end to end."""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.trainer.driver import StepMetrics
from services.trainer.recipes.kto import KTOConfig, feedback_loss, train_kto
from shared.data.formats import Example
from shared.ml.builtin_models import build_tiny_chat_model
from shared.ml.chat_data import DataError
from shared.ml.feedback_data import (
    balance_note,
    balanced_weights,
    collate_feedback,
    evaluate_feedback,
    iter_feedback_batches,
    kl_estimate,
    kto_loss,
    ordering_accuracy,
    plan_feedback,
    read_feedback_examples,
    tokenize_feedback,
)
from shared.ml.preference_metrics import pair_logps
from shared.platform.failures import JobFailure

KTO_DEMO = Path(__file__).parent / "fixtures" / "datasets" / "kto_en_demo.json"  # LLaMA-Factory's demo
TOLERANCE = 1e-6  # fp32: TRL's loss and ours on the same rows
# Summed log-probabilities (tens of tokens, about −100 nats) and the KL estimate from them: TRL's fused LM
# head and our kept logits compute them with other fp32 kernels (relative differences around 1e-7).
LOGP_TOLERANCE = 1e-4


def sum_row(a: int, b: int, desirable: bool, **fields: Any) -> Example:
    answer = f"{a + b}" if desirable else f"I think it is {a + b + 1}, or maybe not."
    return Example(
        kind="chat",
        source=f"line {a * 10 + b}",
        messages=[{"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": answer}],
        fields={"label": desirable, **fields},
    )


# 16 rows, desirable and undesirable alternating: 12 to train, 4 to validate.
ROWS = [sum_row(a, b, (a + b) % 2 == 0) for a in range(1, 5) for b in range(1, 5)]


class RecordingHooks:
    def __init__(self) -> None:
        self.steps: list[StepMetrics] = []
        self.epochs: list[tuple[int, dict | None]] = []

    def on_step(self, m: StepMetrics) -> None:
        self.steps.append(m)

    def on_epoch_end(self, epoch: int, valid_metrics: dict | None) -> None:
        self.epochs.append((epoch, valid_metrics))

    def should_stop(self) -> str | None:
        return None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[int]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(threads)


def make_config(model_dir: Path, output_dir: Path, **overrides: Any) -> KTOConfig:
    config = KTOConfig(
        model_dir=model_dir, output_dir=output_dir, train_examples=ROWS[:12], valid_examples=ROWS[12:],
        n_epochs=2, batch_size=4, learning_rate=1e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=None, max_seq_length=64, seed=0, torch_threads=1,
    )  # fmt: skip
    return replace(config, **overrides)


# -- the loss against TRL's -------------------------------------------------------------------------------


def trl_kto_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], beta: float, weights: tuple[float, float]
):
    """TRL's KTOTrainer._compute_loss, called unbound on an object with the attributes it reads, on the same
    rows: the policy scored by TRL's own fused LM head, the reference log-probabilities precomputed (TRL's
    `precompute_ref_log_probs`) by the same head with the adapter disabled."""
    from trl.trainer.kto_trainer import KTOTrainer

    def completion(prefix: str) -> dict[str, torch.Tensor]:
        return {
            "input_ids": batch[f"{prefix}input_ids"],
            "attention_mask": batch[f"{prefix}attention_mask"],
            "completion_mask": (batch[f"{prefix}labels"] != -100).long(),
        }

    def logps(rows: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = rows["input_ids"].masked_fill(rows["completion_mask"] == 0, -100)
        out = model(
            input_ids=rows["input_ids"],
            attention_mask=rows["attention_mask"],
            labels=labels,
            fused_lm_head=True,
        )
        return out.log_probs.sum(-1)

    matched, mismatched = completion(""), completion("kl_")
    with torch.no_grad(), model.disable_adapter():
        ref_logps, ref_kl_logps = logps(matched), logps(mismatched)
    inputs = {
        **matched, **{f"KL_{k}": v for k, v in mismatched.items()}, "label": batch["desirable"],
        "ref_logps": ref_logps, "ref_KL_logps": ref_kl_logps,
    }  # fmt: skip
    trainer = SimpleNamespace(
        model=model, accelerator=Accelerator(), calculate_KL=True, loss_type="kto", beta=beta,
        desirable_weight=weights[0], undesirable_weight=weights[1], precompute_ref_logps=True,
        aux_loss_enabled=False, _metrics={"train": {}, "eval": {}}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    trainer._metrics = {"train": _Metrics(), "eval": _Metrics()}
    trainer._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(trainer, m, b)
    loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, ref_logps, trainer._metrics["train"]


class _Metrics(dict):
    def __missing__(self, key: str) -> list:
        self[key] = []
        return self[key]


@pytest.fixture(scope="module")
def policy(model_dir: Path) -> torch.nn.Module:
    """The tiny model with TRL's fused LM head, and a LoRA adapter moved off zero so that the policy and the
    reference differ (in both directions: some rewards positive, some negative)."""
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits"))
    torch.manual_seed(0)  # LoRA's A matrices draw from the global generator
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.train()


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.75)])
def test_the_kto_loss_equals_trls_on_the_same_batch(
    policy: torch.nn.Module, model_dir: Path, weights: tuple[float, float], one_thread
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows, _ = tokenize_feedback(tokenizer, ROWS[:6], 64)
    batch = collate_feedback(rows, tokenizer.pad_token_id, 64)

    ours = feedback_loss(policy, batch, beta=0.1, desirable_weight=weights[0], undesirable_weight=weights[1])
    theirs, ref_logps, metrics = trl_kto_loss(policy, batch, 0.1, weights)

    assert (ours.total / ours.weight).item() == pytest.approx(theirs.item(), abs=TOLERANCE)
    # The KL estimate (z_ref), from the rotated rows, is TRL's too, and here not clamped away.
    assert metrics["kl"][0] > 0
    assert (ours.extras["train_kl"] / ours.count).item() == pytest.approx(
        metrics["kl"][0], abs=LOGP_TOLERANCE
    )
    # Our reference log-probabilities (logits kept only where a completion token is predicted) are TRL's.
    with torch.no_grad(), policy.disable_adapter():
        reference, _ = pair_logps(policy, batch)
    assert reference.tolist() == pytest.approx(ref_logps.tolist(), abs=LOGP_TOLERANCE)


def test_the_gradient_flows_through_the_matched_rows_only(
    policy: torch.nn.Module, model_dir: Path, one_thread
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows, _ = tokenize_feedback(tokenizer, ROWS[:4], 64)
    loss = feedback_loss(policy, collate_feedback(rows, tokenizer.pad_token_id, 64), 0.1, 1.0, 1.0)

    assert loss.total.requires_grad
    assert not loss.extras["train_kl"].requires_grad  # z_ref is detached, as in TRL


def test_desirable_and_undesirable_losses_are_the_papers_with_the_reference_point_clamped_at_zero() -> None:
    policy, reference = torch.tensor([-8.0, -8.0]), torch.tensor([-10.0, -10.0])  # log-ratio +2 for both
    desirable = torch.tensor([True, False])

    losses, rewards = kto_loss(
        policy, reference, desirable, torch.tensor(-3.0), beta=0.5, desirable_weight=2.0
    )

    # z = max(−3, 0) = 0; desirable: 2 × (1 − σ(0.5 × 2)); undesirable: 1 − σ(0.5 × (0 − 2)).
    assert losses.tolist() == pytest.approx(
        [2 * (1 - torch.sigmoid(torch.tensor(1.0))).item(), 1 - torch.sigmoid(torch.tensor(-1.0)).item()]
    )
    assert rewards.tolist() == [1.0, 1.0]
    assert kl_estimate(torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -6.0])).item() == 0.0


def test_auto_weights_balance_the_weighted_counts_and_keep_what_the_request_set() -> None:
    assert balanced_weights(None, None, 150, 150)[:2] == (1.0, 1.0)
    desirable, undesirable, reason = balanced_weights(None, None, 100, 300)
    assert (desirable, undesirable) == (3.0, 1.0) and reason.startswith("auto: 100 desirable")
    assert balanced_weights(None, 2.0, 100, 300)[:2] == (6.0, 2.0)
    assert balanced_weights(1.0, 1.0, 100, 300) == (1.0, 1.0, "set by the request")
    # TRL's warning for weights set outside its range; none for the auto ones.
    assert "is 0.33 × undesirable_weight" in (balance_note(1.0, 1.0, 100, 300) or "")
    assert balance_note(*balanced_weights(None, None, 7, 3)[:2], 7, 3) is None


def test_preference_accuracy_is_the_share_of_desirable_undesirable_pairs_ordered_right() -> None:
    # 2 × 3 pairs: 0.5 beats all three, 0.2 beats two and ties one (a half): 5.5 of 6.
    assert ordering_accuracy(torch.tensor([0.5, 0.2]), torch.tensor([0.1, 0.2, 0.0])) == pytest.approx(
        5.5 / 6
    )
    assert ordering_accuracy(torch.tensor([0.5]), torch.tensor([])) is None


# -- the data ---------------------------------------------------------------------------------------------


def test_the_kto_demo_reads_as_feedback_rows_with_their_labels() -> None:
    examples = read_feedback_examples(KTO_DEMO, KTO_DEMO.name)

    assert len(examples) == 300
    assert sum(e.fields["label"] for e in examples) == 150
    assert all(e.messages and e.messages[-1]["role"] == "assistant" for e in examples)


def test_rows_that_are_not_feedback_are_named_by_line_and_field(tmp_path: Path) -> None:
    good = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "label": True,
    }
    rows = [
        good,
        {**good, "label": "yes"},
        {"messages": good["messages"] + [{"role": "user", "content": "Hm?"}], "label": False},
        {"messages": good["messages"]},
    ]
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    with pytest.raises(DataError) as error:
        read_feedback_examples(path, path.name)

    message = str(error.value)
    assert message.startswith("3 of 4 rows of feedback.jsonl are not feedback rows")
    assert "line 2: label: must be true or false, got 'yes'" in message
    assert (
        "line 3: messages: the last message must be the assistant's completion after a prompt, not 'user'"
        in message
    )
    assert 'line 4: missing "label"' in message


def test_the_prompt_keeps_its_end_and_the_completion_its_labels(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = read_feedback_examples(KTO_DEMO, KTO_DEMO.name)[:40]

    uncut, _ = tokenize_feedback(tokenizer, examples, 1 << 20)
    cut, warnings = tokenize_feedback(tokenizer, examples, 64)

    assert any("were cut" in w for w in warnings)
    for whole, short in zip(uncut, cut, strict=True):
        assert short.n_tokens <= 64
        assert len(short.completion_ids) >= min(32, len(whole.completion_ids))  # at least half the length
        assert whole.prompt_ids[len(whole.prompt_ids) - len(short.prompt_ids) :] == short.prompt_ids
        assert whole.completion_ids[: len(short.completion_ids)] == short.completion_ids
        assert short.completion_labels[0] == short.completion_ids[0]  # the completion starts trained


def plan(model_dir: Path, train: list[Example], requested: dict[str, Any], notes: list[str]) -> Any:
    """The feedback kind's planner on `train` (and ROWS[12:] to validate), resolving with the shared rules."""
    from services.evaluator.prepare import TaskRows
    from shared.planning import hyperparams
    from shared.planning.gpu_classes import load_gpu_classes
    from shared.planning.model_facts import read_model_facts
    from shared.platform.records import LoraSettings

    def resolve(stats: Any, encoder: bool = False, length_of: Any = None) -> Any:
        return hyperparams.resolve(
            requested, stats, facts=read_model_facts(model_dir), context=512, base_learning_rate=1e-2,
            lora=LoraSettings(), gpu_class=load_gpu_classes(None)["cpu"], method_type="kto",
        )  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return plan_feedback(
        tokenizer, model_dir, TaskRows(train, ROWS[12:], "validation_file"), resolve, False, notes
    )


def test_the_planner_balances_the_auto_weights_from_the_labels_and_counts_each_row_twice(
    model_dir: Path,
) -> None:
    train = [sum_row(a, b, a != b) for a in range(1, 5) for b in range(1, 4)]  # 9 desirable, 3 undesirable
    notes: list[str] = []

    hp, stats, skipped = plan(model_dir, train, {"max_seq_length": 64}, notes)

    assert (hp.desirable_weight, hp.undesirable_weight) == (1.0, 3.0)
    assert hp.reasons["undesirable_weight"].startswith("auto: 9 desirable and 3 undesirable training rows")
    assert (hp.beta, hp.batch_size, hp.learning_rate) == (0.1, 8, pytest.approx(1e-3))
    rows, _ = tokenize_feedback(AutoTokenizer.from_pretrained(model_dir), train, 64)
    assert stats.train_lengths == [2 * row.n_tokens for row in rows] and skipped == []  # with its KL row
    assert notes == []


def test_the_planner_notes_weights_set_outside_trls_range_and_refuses_one_row_micro_batches(
    model_dir: Path,
) -> None:
    train = [sum_row(a, b, a != b) for a in range(1, 5) for b in range(1, 4)]
    notes: list[str] = []

    plan(model_dir, train, {"desirable_weight": 1.0, "undesirable_weight": 1.0}, notes)
    with pytest.raises(JobFailure, match="at least 2 rows") as refused:
        plan(model_dir, train, {"batch_size": 1}, [])

    assert any("recommend a ratio between 1 and 4/3" in note for note in notes)
    assert refused.value.code == "invalid_hyperparameters"


# -- the recipe -------------------------------------------------------------------------------------------


def scores(model: torch.nn.Module, tokenizer: Any, examples: list[Example]) -> dict[str, Any]:
    rows, _ = tokenize_feedback(tokenizer, examples, 64)
    return evaluate_feedback(model, iter_feedback_batches(rows, 4, tokenizer.pad_token_id, 64), 0.1)


def test_a_few_steps_raise_desirable_and_lower_undesirable_completions_on_the_training_rows(
    model_dir: Path, tmp_path: Path, one_thread
) -> None:
    from peft import PeftModel

    hooks = RecordingHooks()
    result = train_kto(make_config(model_dir, tmp_path), hooks)

    # Step 1: LoRA is a no-op, every reward and z_ref 0, each row costs half its weight.
    assert hooks.steps[0].train_loss == pytest.approx(0.5, abs=1e-6)
    assert [m.step for m in hooks.steps] == [1, 2, 3, 4, 5, 6] and result.total_steps == 6
    assert hooks.steps[-1].train_loss < 0.5
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter")
    trained = scores(model, tokenizer, ROWS[:12])
    assert trained["desirable_reward"] > 0 > trained["undesirable_reward"]  # log π − log π_ref, up and down
    assert trained["reward_accuracy"] > 0.5
    assert trained["logp_margin"] > trained["reference_logp_margin"]
    # The last validation, as the epoch reported it, is what the saved adapter scores on those rows.
    final = hooks.epochs[-1][1]
    assert final is not None and final["n_examples"] == 4
    assert scores(model, tokenizer, ROWS[12:])["loss"] == pytest.approx(final["loss"], abs=1e-5)
    assert result.metrics_rows[-1]["valid_loss"] == final["loss"]
    assert set(result.metrics_rows[0]) == {
        "step", "train_loss", "train_accuracy", "train_kl", "valid_loss", "valid_reward_accuracy", "valid_kl",
    }  # fmt: skip


def test_the_tuned_model_separates_held_out_rows_of_the_same_kind_that_the_base_does_not(
    model_dir: Path, tmp_path: Path, one_thread
) -> None:
    """Sums answered right (desirable) or with a hedged wrong answer (undesirable): after training on 24, the
    adapter ranks 12 sums it never saw by their labels, which the random base cannot."""
    rows = [sum_row(a, b, (a + b) % 2 == 0) for a in range(1, 7) for b in range(1, 7)]
    random.Random(0).shuffle(rows)
    hooks = RecordingHooks()

    train_kto(make_config(model_dir, tmp_path, train_examples=rows[:24], valid_examples=rows[24:]), hooks)

    held_out = hooks.epochs[-1][1]
    assert held_out is not None and held_out["n_examples"] == 12
    # Measured: ordering 0.25 → 1.0, margin −0.30 → +3.29 nats a token, KTO loss 0.5 → 0.33.
    assert held_out["reference_preference_accuracy"] < 0.5 < held_out["preference_accuracy"] == 1.0
    assert held_out["logp_margin"] > held_out["reference_logp_margin"] + 1
    assert held_out["reward_accuracy"] == 1.0
    assert held_out["loss"] < 0.4


def test_a_micro_batch_of_one_row_is_refused(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2 rows per micro-batch"):
        train_kto(make_config(model_dir, tmp_path, batch_size=1), RecordingHooks())


def test_groups_get_their_own_figures(model_dir: Path, one_thread) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules="all-linear")
    )
    examples = [
        replace(e, fields={**e.fields, "group": "small" if i < 6 else "large"}) for i, e in enumerate(ROWS)
    ]

    report = scores(model, tokenizer, examples)

    groups = report["by_group"]["groups"]
    assert {g: v["n_examples"] for g, v in groups.items()} == {"large": 10, "small": 6}
    assert report["loss"] == pytest.approx(0.5, abs=1e-6)  # an untrained adapter: the base's own loss
    assert math.isclose(report["preference_accuracy"], report["reference_preference_accuracy"], abs_tol=1e-9)


# -- end to end -------------------------------------------------------------------------------------------


def feedback_rows(n_desirable: int, n_undesirable: int, skip: int = 0) -> list[dict[str, Any]]:
    """Rows of the KTO demo, desirable and undesirable ones in turn after the first `skip` of each, each with
    a group: single- or multi-turn."""
    rows = json.loads(KTO_DEMO.read_text())
    good = [r for r in rows if r["label"]][skip : skip + n_desirable]
    bad = [r for r in rows if not r["label"]][skip : skip + n_undesirable]
    chosen = [r for pair in zip(good, bad, strict=False) for r in pair] + good[len(bad) :] + bad[len(good) :]
    return [{**r, "group": "single-turn" if len(r["messages"]) == 2 else "multi-turn"} for r in chosen]


@pytest.mark.slow
def test_a_kto_job_trains_on_the_demo_feedback_and_is_evaluated_against_its_base_on_held_out_rows(
    live,
) -> None:
    def upload(client: Any, name: str, rows: list[dict[str, Any]]) -> str:
        body = "".join(json.dumps(row) + "\n" for row in rows).encode()
        response = client.post("/v1/files", files={"file": (name, body)}, data={"purpose": "fine-tune"})
        assert response.status_code == 200 and response.json()["status"] == "processed", response.text
        return response.json()["id"]

    body: dict[str, Any] = {
        "model": "tunery/tiny-chat", "seed": 0,
        "method": {"type": "kto", "kto": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 8, "max_seq_length": 128, "learning_rate_multiplier": 3,
        }}},
    }  # fmt: skip
    with live.client() as client:
        body["training_file"] = upload(client, "kto_train.jsonl", feedback_rows(24, 16))
        body["validation_file"] = upload(client, "kto_valid.jsonl", feedback_rows(12, 12, skip=60))
        job = client.post("/v1/fine_tuning/jobs", json=body).json()
        assert job["method"]["kto"]["hyperparameters"]["desirable_weight"] == "auto", job

    job, _ = live.wait_for_job(job["id"], {"succeeded", "failed", "cancelled"}, timeout=600)
    assert job["status"] == "succeeded", job["error"]
    hp = job["method"]["kto"]["hyperparameters"]
    # 24 desirable and 16 undesirable rows: the undesirable ones weigh 1.5 so both sides count alike.
    assert (hp["beta"], hp["desirable_weight"], hp["undesirable_weight"]) == (0.1, 1.0, 1.5)
    assert job["progress"]["total_steps"] == 10  # 40 rows, 8 a step, 2 epochs
    # Each row and its mismatched KL row: the estimate counts both uncut, training cuts a KL row longer
    # than max_seq_length (a prompt with a longer row's completion).
    assert (
        0.95 * job["estimate"]["trained_tokens"] <= job["trained_tokens"] <= job["estimate"]["trained_tokens"]
    )
    with live.client() as client:
        text = client.get(f"/v1/files/{job['result_files'][0]}/content").text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == [
        "step",
        "train_loss",
        "train_accuracy",
        "train_kl",
        "valid_loss",
        "valid_reward_accuracy",
        "valid_kl",
    ]
    assert 0.5 <= float(rows[0]["train_loss"]) <= 0.75  # step 1: every reward 0, each row half its weight

    report = job["evaluation"]
    assert report["task"] == "kto"
    assert (report["validation_source"], report["n_examples"], report["n_desirable"]) == (
        "validation_file",
        24,
        12,
    )
    base, tuned = report["base"], report["fine_tuned"]
    assert base["loss"] == pytest.approx(0.5 * (12 * 1.0 + 12 * 1.5) / 24)  # the base: rewards and z_ref 0
    assert base["reward_accuracy"] is None and tuned["reward_accuracy"] is not None
    for figures in (base, tuned):
        assert 0 <= figures["preference_accuracy"] <= 1 and figures["logp_margin"] is not None
    # The evaluator's KTO figures are the trainer's last validation, recomputed from the published adapter.
    assert tuned["loss"] == pytest.approx(float(rows[-1]["valid_loss"]), abs=1e-4)
    assert tuned["reward_accuracy"] == pytest.approx(float(rows[-1]["valid_reward_accuracy"]))
    assert set(report["by_group"]["groups"]) == {"single-turn", "multi-turn"}
    # Measured: the random 2-layer model learns the demo's English, not which answers are better (its
    # desirable and undesirable completions differ in quality, not in form): every completion's
    # log-probability rose (rewards +0.92 desirable, +1.17 undesirable; z_ref 9.7 nats), the ordering fell
    # (0.51 → 0.46) and the held-out KTO loss rose (0.625 → 0.668): "regressed", as the report says. Held-out
    # rows whose labels follow from their form are learned (the test on sums above: 0.25 → 1.0).
    assert tuned["kl"] > 0 and tuned["desirable_reward"] != 0
    change = tuned["loss"] - base["loss"]
    assert report["verdict"] == (
        "improved" if change < -1e-3 else "regressed" if change > 1e-3 else "unchanged"
    )
    assert report["verdict_summary"].startswith(f"KTO loss {base['loss']:.4f} → {tuned['loss']:.4f}")
