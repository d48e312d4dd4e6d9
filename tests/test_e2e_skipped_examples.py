"""End to end on real processes: real alpaca rows on the README's model train although one example's reply
lies wholly past the 512-token limit (it is skipped, with one warning naming it), and a file cut nearly
everywhere fails before training, naming why. The API, trainer and evaluator run as `tunery` processes on
the test Redis and S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.live import LiveTunery

pytestmark = pytest.mark.slow

# Items 301-400 of LLaMA-Factory's alpaca demo set: item 72's prompt alone is longer than 512 tokens.
ALPACA_100 = Path(__file__).parent / "fixtures" / "datasets" / "alpaca_en_demo_301_400.json"
FINISHED = {"succeeded", "failed", "cancelled"}


def upload(client, body: bytes, name: str) -> dict:
    response = client.post("/v1/files", files={"file": (name, body)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()


def cut_nearly_everywhere() -> bytes:
    """18 chat rows whose prompt alone is longer than 512 tokens, then 2 short ones."""

    def row(question: str, answer: str) -> str:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return json.dumps({"messages": messages}) + "\n"

    rows = [row(f"Row {i}: " + "words " * 120, "ok") for i in range(18)] + [
        row("2+2?", "4"),
        row("3+3?", "6"),
    ]
    return "".join(rows).encode()


def test_alpaca_rows_train_skipping_the_example_cut_away_and_a_file_cut_everywhere_fails(
    live: LiveTunery,
) -> None:
    with live.client() as client:
        alpaca = upload(client, ALPACA_100.read_bytes(), ALPACA_100.name)
        cut = upload(client, cut_nearly_everywhere(), "cut.jsonl")
        assert alpaca["status"] == cut["status"] == "processed"
        # Before any job: the file report with the model's tokenizer says what a job would do.
        report = client.get(f"/v1/files/{alpaca['id']}/report", params={"model": "tunery/tiny-chat"}).json()
        cut_report = client.get(f"/v1/files/{cut['id']}/report", params={"model": "tunery/tiny-chat"}).json()
        # Seed 3 keeps item 72 among the training rows (the held-out split is the trainer's too).
        # Unpacked: the trainer counts its steps from the examples left, as the estimate does (6 × 16 ≥ 89).
        hyperparameters = {"n_epochs": 1, "batch_size": 16, "packing": False}
        body = {"model": "tunery/tiny-chat", "seed": 3, "hyperparameters": hyperparameters}
        job = client.post("/v1/fine_tuning/jobs", json=body | {"training_file": alpaca["id"]}).json()
        doomed = client.post("/v1/fine_tuning/jobs", json=body | {"training_file": cut["id"]}).json()

    assert report["tokens"]["skipped_examples"] == 1
    assert report["skipped_examples"] == {"count": 1, "of": 100, "sources": ["item 72"]}
    assert report["notes"][0].startswith("Skipped 1 of 100 training examples (item 72): at the maximum")
    assert cut_report["skipped_examples"]["count"] == 18
    assert cut_report["notes"][0].startswith(
        "A job on this file would fail with invalid_training_data: 18 of 20"
    )

    failed, seen = live.wait_for_job(doomed["id"], FINISHED)
    assert failed["status"] == "failed" and "running" not in seen
    assert (failed["error"]["code"], failed["error"]["param"]) == ("invalid_training_data", "training_file")
    assert (
        "training examples have nothing left to train on at the maximum sequence length (512 tokens)"
        in (failed["error"]["message"])
    )

    done, _ = live.wait_for_job(job["id"], FINISHED)
    assert done["status"] == "succeeded", done["error"]
    estimate = done["estimate"]
    assert estimate["skipped_examples"]["training"] == {"count": 1, "of": 90, "sources": ["item 72"]}
    assert estimate["train_examples"] == 89
    # What the estimate said before training is what training did, without the example skipped.
    assert estimate["optimizer_steps"] == done["progress"]["total_steps"] == 6
    assert estimate["trained_tokens"] == done["trained_tokens"]
    with live.client() as client:
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    warnings = [e for e in events if e["message"].startswith("Skipped")]
    assert len(warnings) == 1 and warnings[0]["level"] == "warn"
    assert "Skipped 1 example with nothing left to train on" in warnings[0]["message"]
    assert "1 of 90 training examples (item 72)" in warnings[0]["message"]
    assert warnings[0]["data"]["training"]["count"] == 1
    assert any(e["message"].startswith("Training started: 89 examples, validating on 10") for e in events)
