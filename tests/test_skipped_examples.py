"""Examples truncation leaves with nothing to learn: a job skips them with one warning naming them, and fails
only when too few are left (`shared.ml.chat_data.MIN_KEPT_FRACTION`), for the training rows and the held-out or
validation rows alike. Runs the real `validating_files` task on the real Redis and the built-in tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.api_fixtures import prepared

# Items 301-400 of LLaMA-Factory's alpaca demo set: item 72's prompt alone is longer than 512 tokens.
ALPACA_100 = Path(__file__).parent / "fixtures" / "datasets" / "alpaca_en_demo_301_400.json"


def upload(api, body: bytes, name: str) -> dict:
    response = api.post("/v1/files", files={"file": (name, body)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()


def create(api, training_file: str, **body) -> dict:
    response = api.post(
        "/v1/fine_tuning/jobs", json={"model": "tunery/tiny-chat", "training_file": training_file, **body}
    )
    assert response.status_code == 200, response.text
    return response.json()


def long_prompt_lines(n_long: int, n_short: int) -> bytes:
    """Chat rows: `n_long` whose prompt fills more than 512 tokens (lines 1..n_long), then short ones."""

    def row(question: str, answer: str) -> str:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return json.dumps({"messages": messages}) + "\n"

    long = [row(f"Row {i}: " + "words " * 120, "ok") for i in range(n_long)]
    short = [row(f"What is {i} + {i}?", str(2 * i)) for i in range(n_short)]
    return "".join(long + short).encode()


@pytest.mark.parametrize(
    ("seed", "where", "dataset"), [(3, "training", "training"), (2, "validation", "held-out")]
)
def test_alpaca_rows_queue_with_one_warning_naming_the_example_skipped(
    api, api_settings, seed: int, where: str, dataset: str
) -> None:
    """Seed 3 keeps item 72 among the training rows, seed 2 holds it out."""
    file = upload(api, ALPACA_100.read_bytes(), ALPACA_100.name)
    assert file["status"] == "processed"

    job = prepared(api, api_settings, create(api, file["id"], seed=seed)["id"])

    assert job["status"] == "queued", job["error"]
    estimate = job["estimate"]
    skipped = estimate["skipped_examples"]
    assert skipped["max_seq_length"] == job["resolved_hyperparameters"]["max_seq_length"] == 512
    assert (skipped["training"]["of"], skipped["validation"]["of"]) == (90, 10)
    assert skipped[where] == {"count": 1, "of": 10 if where == "validation" else 90, "sources": ["item 72"]}
    # The estimate counts what trains: the example skipped is in neither figure.
    assert estimate["train_examples"] + estimate["valid_examples"] == 99
    assert estimate["train_tokens"]["skipped_examples"] == skipped["training"]["count"]
    assert "skipped" in job["hyperparameter_reasons"]["max_seq_length"]
    assert skipped["warning"] in estimate["notes"]

    events = api.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    warnings = [e for e in events if "Skipped" in e["message"]]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warn" and warnings[0]["data"] == skipped
    assert warnings[0]["message"].startswith(
        "Skipped 1 example with nothing left to train on at the maximum "
    )
    assert f"{dataset} examples (item 72)" in warnings[0]["message"]


def test_a_training_file_cut_nearly_everywhere_fails_naming_its_lines(api, api_settings) -> None:
    file = upload(api, long_prompt_lines(18, 2), "cut.jsonl")
    # However the 2 rows held out fall, at most 2 of the 18 training rows are left.
    job = prepared(api, api_settings, create(api, file["id"])["id"])

    assert job["status"] == "failed"
    error = job["error"]
    assert (error["code"], error["param"]) == ("invalid_training_data", "training_file")
    assert (
        "training examples have nothing left to train on at the maximum sequence length (512 tokens)"
        in (error["message"])
    )
    assert "at least 50% must be; raise max_seq_length" in error["message"]
    assert "line " in error["message"]


def test_a_validation_file_cut_nearly_everywhere_fails_against_that_file(api, api_settings) -> None:
    training = upload(api, long_prompt_lines(0, 20), "train.jsonl")
    validation = upload(api, long_prompt_lines(9, 1), "valid.jsonl")

    body = {"validation_file": validation["id"], "hyperparameters": {"max_seq_length": 512}}
    job = prepared(api, api_settings, create(api, training["id"], **body)["id"])

    assert job["status"] == "failed"
    error = job["error"]
    assert (error["code"], error["param"]) == ("invalid_training_data", "validation_file")
    assert error["message"].startswith(
        "9 of 10 validation examples have nothing left to train on at the maximum sequence length (512 tokens)"
    )
    assert "(line 1, line 2, line 3, line 4, line 5 and 4 more)" in error["message"]


def preference_lines(n_alike: int, n_distinct: int) -> bytes:
    """OpenAI DPO rows: `n_alike` whose replies differ only after 100 tokens, then distinct ones."""

    def row(question: str, chosen: str, rejected: str) -> str:
        return json.dumps({
            "input": {"messages": [{"role": "user", "content": question}]},
            "preferred_output": [{"role": "assistant", "content": chosen}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}],
        }) + "\n"  # fmt: skip

    same = "Same words " * 10
    alike = [row(f"Question {i}?", same + "then kind.", same + "then rude.") for i in range(n_alike)]
    distinct = [row(f"What is {i} + {i}?", str(2 * i), "purple") for i in range(n_distinct)]
    return "".join(alike + distinct).encode()


@pytest.mark.parametrize(("n_alike", "fails"), [(3, False), (15, True)])
def test_dpo_pairs_cut_to_the_same_tokens_are_skipped_or_fail_the_job(
    api, api_settings, n_alike: int, fails: bool
) -> None:
    file = upload(api, preference_lines(n_alike, 20 - n_alike), "pairs.jsonl")
    method = {"type": "dpo", "dpo": {"hyperparameters": {"max_seq_length": 64, "n_epochs": 1}}}

    job = prepared(api, api_settings, create(api, file["id"], method=method, seed=3)["id"])

    if fails:
        assert job["status"] == "failed"
        assert (job["error"]["code"], job["error"]["param"]) == ("invalid_training_data", "training_file")
        assert (
            "training preference pairs have nothing left to train on at the maximum sequence length (64 "
            in (job["error"]["message"])
        )
        return
    assert job["status"] == "queued", job["error"]
    skipped = job["estimate"]["skipped_examples"]
    both = [skipped["training"], skipped["validation"]]
    assert sum(s["count"] for s in both) == 3
    assert sorted(source for s in both for source in s["sources"]) == ["line 1", "line 2", "line 3"]
    assert job["estimate"]["train_examples"] == 18 - skipped["training"]["count"]
    assert skipped["warning"].startswith("Skipped 3 preference pairs with nothing left to train on")
