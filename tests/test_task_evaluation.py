"""The evaluation reports of classification and DPO jobs (services/evaluator/classification_eval.py and
preference_eval.py), on tiny models trained here by the real recipes and published as the trainer publishes
them: the base model and the tuned one on the same held-out rows, side by side, per group, with a verdict."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from services.evaluator import classification_eval, preference_eval
from services.evaluator.cancellation import CancelWatch, EvaluationCancelled
from services.trainer.recipes.classification import ClassificationConfig, train_classification
from services.trainer.recipes.dpo import DPOConfig, train_dpo
from shared.data.formats import Example
from shared.ml.classification_data import LABELS_FILE
from shared.ml.materialize import materialize
from shared.ml.task_data import split_jsonl
from shared.planning.catalog import load_catalog
from shared.platform import storage_keys
from shared.platform.file_store import FileStore
from shared.platform.ids import new_file_id, new_job_id
from shared.platform.job_states import JobState
from shared.platform.job_store import JobStore
from shared.platform.records import DEFAULT_TENANT, FileRecord, Hyperparameters, JobRecord, LoraSettings, now
from shared.platform.settings import Settings
from shared.platform.storage import Storage, storage_from_settings
from tests.test_classification import sentiment
from tests.test_dpo import sum_pair

BASE = "tunery/tiny-chat"
SEED = 0
MAX_SEQ_LENGTH = 64
LOG_2 = math.log(2)


class NoHooks:
    def on_step(self, m: Any) -> None:
        pass

    def on_epoch_end(self, epoch: int, valid_metrics: dict | None) -> None:
        pass

    def should_stop(self) -> None:
        return None


@pytest.fixture(scope="module")
def base_dir(model_cache: Path) -> Path:
    settings = Settings(model_cache_dir=model_cache, model_catalog=None)
    return materialize(load_catalog(settings)[BASE], settings)


def with_groups(examples: list[Example]) -> list[Example]:
    """Rows grouped by their length: a group field as a user's data would carry it."""
    return [replace(e, fields={"group": "long" if len(e.text or "") > 18 else "short"}) for e in examples]


@pytest.fixture(scope="module")
def classifiers(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A sentiment classifier per method on the tiny Llama, as the trainer saves it."""
    trained = {}
    for method in ("lora", "full"):
        out = tmp_path_factory.mktemp(f"classifier-{method}")
        config = ClassificationConfig(
            model_dir=base_dir, output_dir=out, train_examples=sentiment(64, seed=1), valid_examples=None,
            n_epochs=3, batch_size=8, learning_rate=5e-3 if method == "lora" else 1e-3,
            max_seq_length=MAX_SEQ_LENGTH, seed=SEED, method=method, lora_r=8, lora_alpha=16, lora_dropout=0.0,
            torch_threads=1,
        )  # fmt: skip
        train_classification(config, NoHooks())
        trained[method] = out
    return trained


PAIRS = [sum_pair(a, b, group="small" if a + b < 6 else "large") for a in range(1, 6) for b in range(1, 6)]


@pytest.fixture(scope="module")
def dpo_adapter(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dpo")
    config = DPOConfig(
        model_dir=base_dir, output_dir=out, train_examples=PAIRS[::2], valid_examples=None, n_epochs=4,
        batch_size=4, learning_rate=1e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0, target_modules=None,
        max_seq_length=MAX_SEQ_LENGTH, seed=SEED, torch_threads=1,
    )  # fmt: skip
    train_dpo(config, NoHooks())
    return out


@pytest.fixture
def settings(api_settings: Settings) -> Settings:
    return api_settings.model_copy(update={"model_catalog": None})


@pytest.fixture
def redis(settings: Settings) -> Redis:
    return Redis.from_url(settings.effective_redis_url)


@pytest.fixture
def storage(settings: Settings) -> Storage:
    return storage_from_settings(settings)


def evaluating_job(storage: Storage, out: Path, method_type: str, **hyperparameters: Any) -> JobRecord:
    """A job in `evaluating` whose trainer published `out` (adapter or model, tokenizer, labels)."""
    record = JobRecord(
        id=new_job_id(), tenant=DEFAULT_TENANT, created_at=now(), model=BASE, training_file="file-train",
        seed=SEED, lora=LoraSettings(), method_type=method_type, state=JobState.EVALUATING,
        hyperparameters=Hyperparameters(
            n_epochs=1, batch_size=8, micro_batch_size=8, learning_rate_multiplier=1.0, learning_rate=1e-3,
            max_seq_length=MAX_SEQ_LENGTH, **hyperparameters,
        ),
    )  # fmt: skip
    folders = {
        "adapter": storage_keys.adapter_prefix,
        "model": storage_keys.model_prefix,
        "tokenizer": storage_keys.tokenizer_prefix,
    }
    for name, prefix_of in folders.items():
        if (out / name).is_dir():
            record.artifacts[name] = prefix_of(record.tenant, record.id)
            storage.upload_directory(out / name, record.artifacts[name])
    if (out / LABELS_FILE).exists():
        record.artifacts["labels"] = storage_keys.labels_key(record.tenant, record.id)
        storage.upload_file(out / LABELS_FILE, record.artifacts["labels"])
    return record


def store_split(storage: Storage, record: JobRecord, rows: list[Example]) -> None:
    """The held-out rows, as the trainer stores them when the job has no validation file."""
    storage.put_bytes(storage_keys.validation_split_key(record.tenant, record.id), split_jsonl(rows))


def upload_validation_file(redis: Redis, storage: Storage, record: JobRecord, rows: list[Example]) -> None:
    """A validation file of the job's tenant, as the API stores an upload (JSONL rows with their fields)."""
    file_id = new_file_id()
    key = storage_keys.file_key(record.tenant, file_id)
    body = split_jsonl(rows)
    storage.put_bytes(key, body)
    file = FileRecord(
        id=file_id, tenant=record.tenant, filename="valid.jsonl", purpose="fine-tune", bytes=len(body),
        created_at=now(), status="processed", sha256="0" * 64, storage_key=key, format="classification",
        task="classification", n_examples=len(rows),
    )  # fmt: skip
    FileStore(redis).save(file)
    record.validation_file = file_id


# -- classification ---------------------------------------------------------------------------------------


def test_a_lora_classifier_beats_its_untuned_start_on_the_held_out_split_overall_and_per_group(
    settings: Settings, redis: Redis, storage: Storage, classifiers: dict[str, Path]
) -> None:
    record = evaluating_job(storage, classifiers["lora"], "classification", method="lora")
    held_out = with_groups(sentiment(40, seed=3))
    store_split(storage, record, held_out)

    report = classification_eval.evaluate(settings, redis, storage, record)

    assert (report["task"], report["validation_source"], report["n_examples"]) == (
        "classification",
        "held_out_split",
        40,
    )
    assert report["labels"] == ["negative", "positive"]
    base, tuned = report["base"], report["fine_tuned"]
    # Measured: the fresh head guesses (accuracy 0.40), the trained one reads the sentiment word (1.00).
    assert tuned["accuracy"] >= 0.9 and tuned["accuracy"] >= base["accuracy"] + 0.3
    assert report["accuracy_change"] == pytest.approx(tuned["accuracy"] - base["accuracy"])
    assert report["verdict"] == "improved"
    assert report["verdict_summary"].startswith(f"accuracy {base['accuracy']:.4f} → {tuned['accuracy']:.4f}")
    for figures in (base, tuned):
        assert sum(map(sum, figures["confusion_matrix"])) == 40
        assert set(figures["per_class"]) == {"negative", "positive"}
        assert {"precision", "recall", "f1", "support"} <= set(figures["per_class"]["positive"])

    by_group = report["by_group"]
    assert by_group["field"] == "group" and by_group["n_without_group"] == 0
    assert set(by_group["groups"]) == {"long", "short"}
    assert sum(g["n_examples"] for g in by_group["groups"].values()) == 40
    for name in ("base", "fine_tuned"):
        accuracies = [g[name]["accuracy"] for g in by_group["groups"].values()]
        assert by_group["gaps"][name]["accuracy"]["gap"] == pytest.approx(max(accuracies) - min(accuracies))
    assert by_group["gap_change"]["accuracy"] == pytest.approx(
        by_group["gaps"]["fine_tuned"]["accuracy"]["gap"] - by_group["gaps"]["base"]["accuracy"]["gap"]
    )
    json.dumps(report)  # stored as the job's evaluation.json


def test_a_fully_fine_tuned_classifier_is_scored_on_the_jobs_validation_file(
    settings: Settings, redis: Redis, storage: Storage, classifiers: dict[str, Path]
) -> None:
    record = evaluating_job(storage, classifiers["full"], "classification", method="full")
    assert "model" in record.artifacts and "adapter" not in record.artifacts
    upload_validation_file(redis, storage, record, sentiment(30, seed=4))

    report = classification_eval.evaluate(settings, redis, storage, record)

    assert (report["validation_source"], report["n_examples"]) == ("validation_file", 30)
    assert report["fine_tuned"]["accuracy"] >= 0.9 > report["base"]["accuracy"]
    assert report["by_group"] is None  # no row carries a group


def test_the_classification_verdict_follows_the_accuracy() -> None:
    def scores(accuracy: float) -> dict[str, Any]:
        return {
            "accuracy": accuracy, "macro_f1": accuracy, "loss": 0.5, "per_class": {}, "confusion_matrix": [],
            "n_examples": 200, "labels": ["0", "1"], "by_group": None,
        }  # fmt: skip

    def verdict(base: float, tuned: float) -> str:
        return classification_eval.build_report("validation_file", scores(base), scores(tuned))["verdict"]

    assert verdict(0.80, 0.85) == "improved"
    assert verdict(0.80, 0.802) == "unchanged"  # within half a point
    assert verdict(0.80, 0.70) == "regressed"


# -- DPO --------------------------------------------------------------------------------------------------


def test_a_dpo_adapter_prefers_the_chosen_replies_of_held_out_pairs_more_than_the_base(
    settings: Settings, redis: Redis, storage: Storage, dpo_adapter: Path
) -> None:
    record = evaluating_job(storage, dpo_adapter, "dpo", beta=0.1)
    held_out = PAIRS[1::2]  # 12 pairs the adapter never saw
    store_split(storage, record, held_out)

    report = preference_eval.evaluate(settings, redis, storage, record)

    assert (report["task"], report["validation_source"], report["n_examples"], report["beta"]) == (
        "dpo", "held_out_split", 12, 0.1,
    )  # fmt: skip
    base, tuned = report["base"], report["fine_tuned"]
    # The base is its own reference: DPO loss log 2, no reward.
    assert (base["loss"], base["reward_margin"], base["reward_accuracy"]) == (LOG_2, 0.0, None)
    # Measured: held-out DPO loss 0.0004, reward accuracy 1.0 (margin 7.8); the tuned model's own ranking
    # puts the chosen reply first on every pair, the base's on half of them.
    assert tuned["loss"] < LOG_2 - 0.1
    assert tuned["reward_accuracy"] >= 0.75 and tuned["reward_margin"] > 0
    assert tuned["preference_accuracy"] > base["preference_accuracy"]
    assert report["loss_change"] == pytest.approx(tuned["loss"] - LOG_2)
    assert report["verdict"] == "improved"
    assert report["preference_accuracy_change"] == pytest.approx(
        tuned["preference_accuracy"] - base["preference_accuracy"]
    )

    by_group = report["by_group"]
    assert set(by_group["groups"]) == {"large", "small"}
    assert sum(g["n_examples"] for g in by_group["groups"].values()) == 12
    small = by_group["groups"]["small"]
    assert small["base"]["loss"] == LOG_2 and small["fine_tuned"]["loss"] < LOG_2
    assert set(by_group["gaps"]["fine_tuned"]) == {"preference_accuracy", "reward_accuracy"}
    json.dumps(report)


def test_the_dpo_verdict_follows_the_held_out_loss_against_log_2() -> None:
    def scores(loss: float) -> dict[str, Any]:
        figures = {"preference_accuracy": 0.5, "logp_margin": 0.0, "n_pairs": 10, "by_group": None}
        rewards = {"reward_accuracy": 0.5, "reward_margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0}
        return figures | rewards | {"loss": loss}

    def verdict(loss: float) -> str:
        return preference_eval.build_report("validation_file", scores(LOG_2), scores(loss), beta=0.1)[
            "verdict"
        ]

    assert (verdict(0.6), verdict(LOG_2 + 1e-4), verdict(0.8)) == ("improved", "unchanged", "regressed")


# -- cancel ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["classifier-lora", "classifier-full", "dpo"])
def test_an_evaluation_runs_while_its_job_evaluates_and_stops_at_its_first_forward_pass_once_cancelled(
    settings: Settings,
    redis: Redis,
    storage: Storage,
    classifiers: dict[str, Path],
    dpo_adapter: Path,
    weights: str,
) -> None:
    if weights == "dpo":
        record = evaluating_job(storage, dpo_adapter, "dpo", beta=0.1)
        store_split(storage, record, PAIRS[1::2])
        evaluate = preference_eval.evaluate
    else:
        method = weights.removeprefix("classifier-")
        record = evaluating_job(storage, classifiers[method], "classification", method=method)
        store_split(storage, record, sentiment(40, seed=3))
        evaluate = classification_eval.evaluate
    jobs = JobStore(redis, storage)
    jobs.create(record, "created")

    report = evaluate(settings, redis, storage, record, watch=CancelWatch(jobs, record.id, record.attempt))
    assert report["n_examples"] > 0
    jobs.transition(record.id, JobState.CANCELLED, "cancelled by the user")
    with pytest.raises(EvaluationCancelled, match=f"job {record.id} is cancelled"):
        evaluate(settings, redis, storage, record, watch=CancelWatch(jobs, record.id, record.attempt))
