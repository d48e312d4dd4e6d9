"""The causal-LM evaluation report: group gaps, the verdict line, the model card, and one real evaluation
of the built-in tiny model with a tiny adapter (generations stored, groups reported, redaction kept)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from services.evaluator.task import ModelScores, _succeed, build_report, evaluate
from shared.ml.generation_metrics import GenerationCase
from shared.ml.group_metrics import group_members, largest_gap, pool_token_metrics
from shared.planning.model_card import render_model_card
from shared.platform import storage_keys
from shared.platform.file_store import FileStore
from shared.platform.ids import new_file_id, new_job_id
from shared.platform.job_states import JobState
from shared.platform.job_store import JobStore
from shared.platform.records import FileRecord, Hyperparameters, JobRecord, LoraSettings, now
from shared.platform.settings import Settings
from shared.platform.storage import LocalStorage

TENANT = "org-eval"


def test_group_members_index_rows_by_group_value_and_leave_out_rows_without_one() -> None:
    assert group_members(["b", None, "a", "b", 7]) == {"7": [4], "a": [2], "b": [0, 3]}
    assert list(group_members(["b", "a"])) == ["a", "b"]
    assert group_members([None, None]) == {}


def test_the_largest_gap_is_best_minus_worst_whichever_way_the_metric_points() -> None:
    per_group = {
        "a": {"loss": 1.0, "acc": 0.9},
        "b": {"loss": 1.5, "acc": 0.6},
        "c": {"loss": 1.2, "acc": None},
    }
    assert largest_gap(per_group, "acc") == {"gap": pytest.approx(0.3), "best_group": "a", "worst_group": "b"}
    loss = largest_gap(per_group, "loss", higher_is_better=False)
    assert loss == {"gap": 0.5, "best_group": "a", "worst_group": "b"}
    assert largest_gap({"a": {"acc": None}}, "acc") is None


def test_pooled_token_metrics_weigh_each_part_by_its_tokens() -> None:
    parts = [
        {"loss": 1.0, "perplexity": math.e, "mean_token_accuracy": 0.5, "n_tokens": 10},
        {"loss": 2.0, "perplexity": math.e**2, "mean_token_accuracy": 0.2, "n_tokens": 30},
    ]
    pooled = pool_token_metrics(parts)
    assert pooled["loss"] == pytest.approx(1.75)  # (10 × 1 + 30 × 2) / 40
    assert pooled["perplexity"] == pytest.approx(math.exp(1.75))
    assert pooled["mean_token_accuracy"] == pytest.approx(0.275)  # (5 + 6) correct of 40
    assert pooled["n_tokens"] == 40
    with pytest.raises(ValueError, match="no trainable tokens"):
        pool_token_metrics([])


def _tokens(loss: float, accuracy: float, n_tokens: int) -> dict[str, float]:
    return {"loss": loss, "perplexity": math.exp(loss), "mean_token_accuracy": accuracy, "n_tokens": n_tokens}


# Rows 0 and 1 are group a, rows 2 and 4 group b, row 3 has none; rows 0, 2 and 3 are answered.
GROUPS = ["a", "a", "b", None, "b"]
CASES = [
    GenerationCase(0, [{"role": "user", "content": "Is it?"}], "yes"),
    GenerationCase(2, [{"role": "user", "content": "Is it not?"}], "no"),
    GenerationCase(3, [{"role": "user", "content": "Well?"}], "maybe"),
]
BASE = ModelScores(
    tokens=_tokens(2.5, 0.3, 50),
    tokens_by_group={"a": _tokens(2.0, 0.5, 10), "b": _tokens(3.0, 0.2, 30)},
    replies=["no", "no", "maybe"],  # wrong for a, right for b
)
TUNED = ModelScores(
    tokens=_tokens(2.0, 0.4, 50),
    tokens_by_group={"a": _tokens(1.0, 0.7, 10), "b": _tokens(2.5, 0.3, 30)},
    replies=["yes", "yes", "maybe"],  # right for a, wrong for b
)


def test_the_report_keeps_its_keys_and_adds_generation_metrics_and_the_verdict_line() -> None:
    report = build_report("validation_file", GROUPS, CASES, BASE, TUNED)
    assert report["validation_source"] == "validation_file"
    assert (report["n_examples"], report["n_tokens"]) == (5, 50)
    assert report["verdict"] == "improved"
    assert report["loss_change"] == pytest.approx(-0.5)
    assert report["loss_relative_change"] == pytest.approx(-0.2)
    assert report["base"]["loss"] == 2.5 and report["fine_tuned"]["mean_token_accuracy"] == 0.4
    assert report["base"]["exact_match"] == pytest.approx(2 / 3)
    assert report["fine_tuned"]["exact_match"] == pytest.approx(2 / 3)
    generation = report["generation"]
    assert generation["n_examples"] == 3 and generation["main_metric"] == "chrf"
    change = report["fine_tuned"]["chrf"] - report["base"]["chrf"]
    assert generation["main_metric_change"] == pytest.approx(change)
    assert report["verdict_summary"] == (
        f"loss 2.5000 → 2.0000 (-0.5000, -20.0%); chrF {report['base']['chrf']:.2f} → "
        f"{report['fine_tuned']['chrf']:.2f} ({change:+.2f}) on 3 generated replies"
    )


def test_every_metric_is_reported_per_group_with_the_gap_between_groups() -> None:
    by_group = build_report("validation_file", GROUPS, CASES, BASE, TUNED)["by_group"]
    assert by_group["field"] == "group" and by_group["n_without_group"] == 1
    a, b = by_group["groups"]["a"], by_group["groups"]["b"]
    assert (a["n_examples"], a["n_tokens"], a["n_generated"]) == (2, 10, 1)
    assert (a["base"]["loss"], a["fine_tuned"]["loss"]) == (2.0, 1.0)
    assert (a["base"]["exact_match"], a["fine_tuned"]["exact_match"]) == (0.0, 1.0)
    assert (b["base"]["exact_match"], b["fine_tuned"]["exact_match"]) == (1.0, 0.0)
    assert b["fine_tuned"]["chrf"] == 0.0  # "yes" for "no" shares no character

    gaps = by_group["gaps"]
    assert gaps["base"]["loss"] == {"gap": 1.0, "best_group": "a", "worst_group": "b"}
    assert gaps["fine_tuned"]["loss"] == {"gap": 1.5, "best_group": "a", "worst_group": "b"}
    assert gaps["base"]["exact_match"] == {"gap": 1.0, "best_group": "b", "worst_group": "a"}
    assert gaps["fine_tuned"]["exact_match"] == {"gap": 1.0, "best_group": "a", "worst_group": "b"}
    assert by_group["gap_change"]["loss"] == pytest.approx(0.5)  # fine-tuning widened the loss gap
    assert by_group["gap_change"]["mean_token_accuracy"] == pytest.approx(0.1)


def test_a_loss_change_within_tolerance_is_unchanged_and_rows_without_groups_have_no_breakdown() -> None:
    tuned = ModelScores(_tokens(2.5005, 0.3, 50), {}, [])
    base = ModelScores(BASE.tokens, {}, [])
    report = build_report("held_out_split", [None] * 5, [], base, tuned)
    assert report["verdict"] == "unchanged"
    assert report["generation"] is None and report["by_group"] is None
    assert report["base"]["chrf"] is None
    assert report["verdict_summary"] == "loss 2.5000 → 2.5005 (+0.0005, +0.0%)"


def _job(**fields) -> JobRecord:
    return JobRecord(
        id=new_job_id(),
        tenant=TENANT,
        created_at=now(),
        model="tunery/tiny-chat",
        training_file=new_file_id(),
        seed=7,
        hyperparameters=Hyperparameters(
            n_epochs=1,
            batch_size=1,
            micro_batch_size=1,
            learning_rate_multiplier=1.0,
            learning_rate=1e-2,
            max_seq_length=256,
        ),
        lora=LoraSettings(),
        **fields,
    )


def test_the_model_card_shows_generation_metrics_and_the_per_group_table() -> None:
    report = build_report("validation_file", GROUPS, CASES, BASE, TUNED)
    card = render_model_card(_job(fine_tuned_model="ft:x"), None, None, report)
    assert "| loss | 2.5000 | 2.0000 |" in card
    assert f"| chrF | {report['base']['chrf']:.2f} | {report['fine_tuned']['chrf']:.2f} |" in card
    assert "Verdict: **improved**: loss 2.5000 → 2.0000 (-0.5000, -20.0%)" in card
    assert "### By group" in card and "`group` field" in card
    assert "| a | 2 | 2.0000 → 1.0000 |" in card
    assert "| **largest gap** | | 1.0000 → 1.5000 (worst: b) |" in card
    assert "1 row has no group and counts only in the totals" in card


# -- one real evaluation ------------------------------------------------------------------------------


def _row(question: str, answer: str, group: str | None) -> dict:
    row: dict = {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    }
    return row | ({"group": group} if group else {})


VALIDATION = [
    _row("Who are you? Write to bob@example.com", "I am Tunery.", "en"),
    _row("Qui es-tu ?", "Je suis Tunery.", "fr"),
    _row("What can you do?", "I answer questions.", "en"),
    _row("Que sais-tu faire ?", "Je réponds.", "fr"),
    _row("Hello", "Hi!", None),
    _row("Bonjour", "Salut !", "fr"),
]


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def evaluated_job(
    client: redis.Redis, local_storage: LocalStorage, model_cache: Path, tmp_path: Path, redis_url: str
) -> tuple[Settings, JobRecord]:
    """A job whose (random, untrained) LoRA adapter and validation file are in storage, ready to evaluate."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from shared.ml.materialize import materialize
    from shared.ml.model_loading import load_causal_lm
    from shared.planning.catalog import load_catalog

    settings = Settings(redis_url=redis_url, data_dir=tmp_path / "data", model_cache_dir=model_cache)
    base_dir = materialize(load_catalog(settings)["tunery/tiny-chat"], settings)
    file_id = new_file_id()
    body = "".join(json.dumps(row) + "\n" for row in VALIDATION).encode()
    file = FileRecord(
        id=file_id, tenant=TENANT, filename="valid.jsonl", purpose="fine-tune", bytes=len(body),
        created_at=now(), status="processed", sha256="0" * 64, storage_key=storage_keys.file_key(TENANT, file_id),
    )  # fmt: skip
    local_storage.put_bytes(file.storage_key, body)
    FileStore(client).save(file)
    job = _job(validation_file=file_id, data_policy="redact", state=JobState.EVALUATING)

    # init_lora_weights=False: random A and B, so the adapter changes the model as a trained one would.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(load_causal_lm(base_dir, trust_remote_code=False, dtype=torch.float32), config)
    model.save_pretrained(tmp_path / "adapter")
    local_storage.upload_directory(tmp_path / "adapter", storage_keys.adapter_prefix(TENANT, job.id))
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp_path / "tokenizer")
    local_storage.upload_directory(tmp_path / "tokenizer", storage_keys.tokenizer_prefix(TENANT, job.id))
    return settings, job


def test_an_evaluation_generates_with_both_models_reports_groups_and_stores_the_replies(
    evaluated_job: tuple[Settings, JobRecord], client: redis.Redis, local_storage: LocalStorage
) -> None:
    settings, job = evaluated_job
    report = evaluate(settings, client, local_storage, job, generation_rows=5)

    assert report["n_examples"] == 6 and report["validation_source"] == "validation_file"
    assert report["generation"]["n_examples"] == 5
    for model in ("base", "fine_tuned"):
        assert all(
            report[model][key] is not None for key in ("loss", "exact_match", "rouge_l", "bleu", "chrf")
        )
    assert report["base"]["loss"] != report["fine_tuned"]["loss"]

    by_group = report["by_group"]
    assert sorted(by_group["groups"]) == ["en", "fr"] and by_group["n_without_group"] == 1
    en, fr = by_group["groups"]["en"], by_group["groups"]["fr"]
    assert (en["n_examples"], en["n_generated"], fr["n_examples"], fr["n_generated"]) == (2, 2, 3, 2)
    assert en["n_tokens"] + fr["n_tokens"] < report["n_tokens"]  # the ungrouped row counts in the totals
    assert by_group["gaps"]["fine_tuned"]["loss"]["gap"] >= 0

    key = storage_keys.generations_key(TENANT, job.id)
    lines = [json.loads(line) for line in local_storage.get_bytes(key).decode().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2, 3, 4]  # the first rows, in file order
    assert [line["group"] for line in lines] == ["en", "fr", "en", "fr", None]
    assert lines[1]["reference"] == "Je suis Tunery."
    assert set(lines[0]["fine_tuned_scores"]) == {"exact_match", "rouge_l", "bleu", "chrf"}
    # data_policy redact: the prompts the models answered held no personal data.
    assert "[REDACTED:email]" in lines[0]["prompt"][0]["content"]
    assert "bob@example.com" not in local_storage.get_bytes(key).decode()

    jobs = JobStore(client, local_storage)
    jobs.create(job, "created")
    _succeed(jobs, local_storage, job, report, settings, client)
    done = jobs.require(job.id)
    assert done.state is JobState.SUCCEEDED and done.artifacts["generations"] == key
    assert done.evaluation == report
    messages = [event["message"] for event in jobs.all_events(job.id)]
    line = f"Evaluation complete on 6 validation_file rows: {report['verdict']}; {report['verdict_summary']}"
    assert line in messages
    card = local_storage.get_bytes(storage_keys.model_card_key(TENANT, job.id)).decode()
    assert "| chrF |" in card and "| en | 2 |" in card
