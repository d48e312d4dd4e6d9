"""ORPO (Hong et al. 2024) on a tiny model: its loss is TRL's on the same batch, its NLL term is the chosen
replies' SFT loss, a few steps teach it the training pairs' preferences, and a job through the API trains
and is evaluated against its base on held-out pairs."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.evaluator.preference_eval import build_ranking_report
from services.trainer.driver import lora_config
from services.trainer.recipes.orpo import ORPOConfig, evaluate_orpo, log_odds_ratio, orpo_loss, train_orpo
from services.trainer.recipes.sft import sft_loss
from shared.methods import method
from shared.ml.builtin_models import build_tiny_chat_model
from shared.ml.preference_data import collate_pairs, iter_preference_batches, tokenize_preferences
from tests.api_fixtures import prepared
from tests.live import LiveTunery
from tests.test_dpo import PAIRS, RecordingHooks
from tests.test_recipe_checkpoints import assert_same_run, assert_same_weights, interrupted_and_whole

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
ORPOTrainer = orpo_trainer.ORPOTrainer

# fp32 on the CPU: the same per-sequence log-probabilities give TRL's loss to rounding (1e-6); the
# log-probabilities themselves come from logits computed another way (only where a reply token is predicted,
# summed in another order), equal to 1e-5.
DPO_DEMO = Path(__file__).parent / "fixtures" / "datasets" / "dpo_en_demo_300.json"  # LLaMA-Factory's demo
LOSS_TOLERANCE = 1e-6
LOGP_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[int]:
    """One torch thread (what a loaded two-core machine runs fastest), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch(model_dir: Path) -> dict[str, torch.Tensor]:
    """Six pairs of different lengths in one `collate_pairs` batch: chosen sides, then rejected sides."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, _ = tokenize_preferences(tokenizer, PAIRS[:6], 64)
    return collate_pairs(pairs, tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def lora_model(model_dir: Path) -> torch.nn.Module:
    """The tiny model with a LoRA adapter moved off zero, so that its replies' probabilities differ."""
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), lora_config(config_for(model_dir))
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    return model


def config_for(model_dir: Path, output_dir: Path | None = None, **overrides: Any) -> ORPOConfig:
    config = ORPOConfig(
        model_dir=model_dir,
        output_dir=output_dir or model_dir / "unused",
        train_examples=PAIRS[:12],
        valid_examples=PAIRS[12:],
        n_epochs=3,
        batch_size=4,
        learning_rate=1e-2,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        max_seq_length=64,
        seed=0,
        torch_threads=1,
    )
    return replace(config, **overrides)


def trl_orpo(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ORPO loss of one batch (`ORPOTrainer.get_batch_loss_metrics`): the chosen rows' cross-entropy
    (as its `concatenated_forward` computes it, on our reply-only labels) minus the mean of
    `odds_ratio_loss` on `get_batch_logps` averages. Returns the loss and that NLL."""
    n = len(labels) // 2
    trainer = type("Trainer", (), {"beta": beta, "accelerator": type("A", (), {"device": logits.device})})()
    nll = torch.nn.CrossEntropyLoss()(
        logits[:n, :-1].reshape(-1, logits.shape[-1]), labels[:n, 1:].reshape(-1)
    )
    logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    losses, *_ = ORPOTrainer.odds_ratio_loss(trainer, logps[:n], logps[n:])
    return nll - losses.mean(), nll


# -- the loss ---------------------------------------------------------------------------------------------


def test_the_log_odds_ratio_is_trls_on_both_sides_of_minus_log_2() -> None:
    """TRL's odds_ratio_loss returns beta × log σ(log-odds ratio) per pair; log(1 − p) is computed two
    ways either side of p = 1/2, so the mean log-probabilities straddle −log 2."""
    chosen = torch.tensor([-0.05, -0.4, -0.69, -0.7, -1.2, -3.0, -9.0])
    rejected = torch.tensor([-0.3, -0.1, -2.0, -0.68, -1.2, -0.5, -11.0])
    trainer = type("Trainer", (), {"beta": 0.25, "accelerator": type("A", (), {"device": "cpu"})})()

    losses, *_ = ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)

    assert (0.25 * log_odds_ratio(chosen, rejected)).tolist() == pytest.approx(
        losses.tolist(), abs=LOSS_TOLERANCE
    )
    assert log_odds_ratio(chosen[4:5], rejected[4:5]).item() == pytest.approx(-math.log(2))  # equal odds


def test_the_orpo_loss_of_a_batch_is_trls_on_the_same_batch(
    lora_model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> None:
    logits = lora_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected, _ = trl_orpo(logits, batch["labels"], beta=0.1)

    loss = orpo_loss(lora_model, batch, beta=0.1)

    assert loss.weight.item() == 6  # pairs: the driver's unit
    assert (loss.total / loss.weight).item() == pytest.approx(expected.item(), abs=LOSS_TOLERANCE)


def test_the_mean_log_probabilities_are_trls_get_batch_logps(
    lora_model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> None:
    """The odds are of each reply's mean per-token probability; TRL's average_log_prob on the full logits."""
    logits = lora_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    trl_logps = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    chosen, rejected = trl_logps.chunk(2)

    loss = orpo_loss(lora_model, batch, beta=0.1)

    expected_wins = int((chosen > rejected).sum())
    assert loss.correct.item() == expected_wins
    ratio_sum = log_odds_ratio(chosen, rejected).sum().item()
    assert loss.extras["train_log_odds_ratio"].item() == pytest.approx(ratio_sum, abs=LOGP_TOLERANCE)


def test_the_nll_term_is_the_sft_loss_of_the_chosen_replies(
    lora_model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> None:
    n = len(batch["input_ids"]) // 2
    chosen = {key: batch[key][:n] for key in ("input_ids", "attention_mask", "labels")}
    sft = sft_loss(lora_model, chosen)

    loss = orpo_loss(lora_model, batch, beta=0.1)

    nll = loss.extras["train_nll_loss"] / loss.weight
    assert nll.item() == pytest.approx((sft.total / sft.weight).item(), abs=LOSS_TOLERANCE)
    _, trl_nll = trl_orpo(
        lora_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        batch["labels"],
        beta=0.1,
    )
    assert nll.item() == pytest.approx(trl_nll.item(), abs=LOSS_TOLERANCE)


def test_without_a_reference_the_verdict_follows_the_preference_accuracy_then_the_margin() -> None:
    def scores(accuracy: float, margin: float) -> dict[str, Any]:
        return {"n_pairs": 20, "preference_accuracy": accuracy, "logp_margin": margin, "by_group": None}

    fit = {"loss": 2.0, "perplexity": 7.4, "mean_token_accuracy": 0.3}

    def verdict(base: dict[str, Any], tuned: dict[str, Any]) -> str:
        return build_ranking_report("validation_file", base, tuned, fit, fit)["verdict"]

    assert verdict(scores(0.6, 0.2), scores(0.7, 0.1)) == "improved"  # more pairs ranked right
    assert verdict(scores(0.6, 0.1), scores(0.5, 0.3)) == "regressed"
    assert verdict(scores(0.6, 0.1), scores(0.6, 0.2)) == "improved"  # a tie: the margin decides
    assert verdict(scores(0.6, 0.1), scores(0.6, 0.1005)) == "unchanged"
    report = build_ranking_report("validation_file", scores(0.6, 0.1), scores(0.7, 0.2), fit, fit)
    # No DPO rewards: each model's ranking, and its fit to the chosen replies.
    assert set(report["fine_tuned"]) == {"preference_accuracy", "logp_margin", *fit}
    assert report["verdict_summary"].startswith("preference accuracy 0.60 → 0.70 (+0.10)")


# -- the job --------------------------------------------------------------------------------------------


def test_an_orpo_job_trains_at_the_supervised_rate_and_is_priced_without_a_reference_forward(
    api, api_settings
) -> None:
    """ORPO trains from the base in one stage: the model's supervised LoRA rate, not DPO's tenth. Its
    estimate counts both sides of every pair, as DPO's, but no reference model's forward pass."""
    pairs = Path(__file__).parent / "fixtures" / "datasets" / "dpo_en_demo.json"  # 30 LLaMA-Factory pairs
    upload = api.post(
        "/v1/files", files={"file": ("pairs.json", pairs.read_bytes())}, data={"purpose": "fine-tune"}
    )
    jobs = {}
    for name in ("orpo", "dpo"):
        method = {"type": name, name: {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}}
        body = {
            "model": "tunery/tiny-chat",
            "seed": 0,
            "training_file": upload.json()["id"],
            "method": method,
        }
        jobs[name] = prepared(api, api_settings, api.post("/v1/fine_tuning/jobs", json=body).json()["id"])
    orpo, dpo = jobs["orpo"], jobs["dpo"]

    assert orpo["status"] == "queued", orpo["error"]
    assert orpo["method"]["orpo"]["hyperparameters"]["beta"] == 0.1
    assert orpo["hyperparameter_reasons"]["beta"].startswith("auto: 0.1")
    assert orpo["resolved_hyperparameters"]["learning_rate"] == pytest.approx(1e-2)  # the catalog's rate
    assert dpo["resolved_hyperparameters"]["learning_rate"] == pytest.approx(1e-3)
    for same in ("train_examples", "trained_tokens", "optimizer_steps"):
        assert orpo["estimate"][same] == dpo["estimate"][same], same
    assert orpo["estimate"]["train_flops"] < dpo["estimate"]["train_flops"]


# -- the recipe -------------------------------------------------------------------------------------------


def test_a_few_steps_lower_the_loss_and_raise_the_preference_accuracy_on_the_training_pairs(
    model_dir: Path, tmp_path: Path, one_thread
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, _ = tokenize_preferences(tokenizer, PAIRS[:12], 64)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    before = evaluate_orpo(base, iter_preference_batches(pairs, 4, tokenizer.pad_token_id), beta=0.1)
    hooks = RecordingHooks()

    result = train_orpo(config_for(model_dir, tmp_path), hooks)

    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")
    after = evaluate_orpo(tuned, iter_preference_batches(pairs, 4, tokenizer.pad_token_id), beta=0.1)
    assert result.steps_completed == 9  # 12 pairs / 4 × 3 epochs
    assert after["loss"] < before["loss"] - 0.5
    assert after["nll_loss"] < before["nll_loss"]
    assert after["log_odds_ratio"] > before["log_odds_ratio"]
    assert after["preference_accuracy"] > before["preference_accuracy"]
    # Each step reports the loss and its two terms; each epoch validates on the held-out pairs.
    first = result.metrics_rows[0]
    assert first["train_loss"] == pytest.approx(first["train_nll_loss"] - 0.1 * first["train_log_odds_ratio"])
    final = hooks.epochs[-1][1]
    assert final is not None and final["n_pairs"] == 4
    assert [result.metrics_rows[-1][f"valid_{name}"] for name in ("loss", "nll_loss")] == [
        final["loss"],
        final["nll_loss"],
    ]


def test_a_resumed_run_repeats_the_uninterrupted_losses(model_dir: Path, tmp_path: Path, one_thread) -> None:
    """As every recipe's (tests/test_recipe_checkpoints.py): suspended at step 5 of 12 and resumed, across an
    epoch end and a new epoch's order, with dropout drawing from the restored generator."""
    config = config_for(model_dir, tmp_path, n_epochs=2, batch_size=2, lora_dropout=0.1)

    full, whole, resumed, second = interrupted_and_whole(train_orpo, config, tmp_path)

    assert_same_run(full, whole, resumed, second)
    weights = "adapter/adapter_model.safetensors"
    assert_same_weights(tmp_path / "full" / weights, tmp_path / "b" / weights)


# -- end to end -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_orpo_job_through_the_api_trains_and_is_evaluated_against_its_base_on_held_out_pairs(
    live: LiveTunery,
) -> None:
    pairs = json.loads(DPO_DEMO.read_text())
    body = {
        "model": "tunery/tiny-chat", "seed": 0,
        "method": {"type": "orpo", "orpo": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 8, "max_seq_length": 128,
        }}},
    }  # fmt: skip
    with live.client() as client:
        for key, name, rows in (
            ("training_file", "train", pairs[:48]),
            ("validation_file", "valid", pairs[48:72]),
        ):
            files = {"file": (f"orpo_{name}.json", json.dumps(rows).encode())}
            body[key] = client.post("/v1/files", files=files, data={"purpose": "fine-tune"}).json()["id"]
        estimate = client.post("/v1/fine_tuning/jobs/estimate", json=body)
        assert estimate.status_code == 200, estimate.text
        job = client.post("/v1/fine_tuning/jobs", json=body).json()
        assert job["method"]["orpo"]["hyperparameters"]["beta"] == "auto"

    job, _ = live.wait_for_job(job["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job["error"]
    assert job["method"]["orpo"]["hyperparameters"]["beta"] == 0.1
    assert job["resolved_hyperparameters"]["learning_rate"] == pytest.approx(1e-2)  # the supervised rate
    # 48 pairs, 8 a step, 2 epochs; the estimate endpoint planned the same job.
    assert estimate.json()["estimate"]["optimizer_steps"] == job["progress"]["total_steps"] == 12
    assert job["estimate"]["trained_tokens"] == job["trained_tokens"]  # both sides of every pair

    with live.client() as client:
        rows = list(
            csv.DictReader(io.StringIO(client.get(f"/v1/files/{job['result_files'][0]}/content").text))
        )
        card = client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/files/README.md").text
    assert list(rows[0]) == list(method("orpo").result_columns)
    first, last = rows[0], rows[-1]
    assert float(first["train_loss"]) == pytest.approx(
        float(first["train_nll_loss"]) - 0.1 * float(first["train_log_odds_ratio"]), abs=1e-5
    )
    assert float(last["train_loss"]) < float(first["train_loss"])

    report = job["evaluation"]
    # As for DPO, 2 of the 24 validation pairs differ only past 128 tokens and are skipped.
    assert (report["task"], report["validation_source"], report["n_examples"]) == (
        "orpo",
        "validation_file",
        22,
    )
    # No reference model, so no implicit rewards: each model's own ranking of the held-out pairs and its
    # fit to their chosen replies (ORPO's supervised part), side by side.
    tuned, base = report["fine_tuned"], report["base"]
    assert (
        set(base)
        == set(tuned)
        == {"preference_accuracy", "logp_margin", "loss", "perplexity", "mean_token_accuracy"}
    )
    # The evaluator's figures are the trainer's last validation, recomputed from the published adapter.
    assert tuned["preference_accuracy"] == pytest.approx(float(last["valid_preference_accuracy"]))
    assert tuned["loss"] == pytest.approx(float(last["valid_nll_loss"]), abs=1e-4)
    # Measured: the chosen replies' held-out loss fell from the base's 5.9 to 4.5 per token and the log-prob
    # margin rose (+0.022 → +0.037), but the ranking fell (0.77 → 0.59, 4 of 22 pairs): 12 steps of a random
    # 2-layer model learn the replies' words (the NLL term outweighs λ × the odds term about ten to one), not
    # which reply is better. The verdict follows the ranking.
    assert tuned["loss"] < base["loss"] - 0.5
    assert report["chosen_loss_change"] == tuned["loss"] - base["loss"]
    assert report["preference_accuracy_change"] == tuned["preference_accuracy"] - base["preference_accuracy"]
    assert report["verdict"] == ("improved" if report["preference_accuracy_change"] > 0 else "regressed")
    assert "A LoRA preference tune (ORPO)" in card and "| preference accuracy |" in card
