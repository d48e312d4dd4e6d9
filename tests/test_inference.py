"""Trying a model before exporting it: chat completions and classifications, answered by the inference
worker from a catalog model, a fine-tuned LoRA adapter, a job's checkpoint, or a fine-tuned classifier
(LoRA or full weights).

The tasks run here in-process against the real Redis and storage; the last two tests run the real API and
`tunery inference` processes (the last with a trainer and evaluator, for a job's real checkpoints) and call
them through the official openai SDK and over HTTP.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from openai import OpenAI
from peft import LoraConfig, PeftModel, get_peft_model
from redis import Redis
from rq import Worker
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.api.app import create_app
from services.inference.task import ModelCache, chat_completion, classify
from services.trainer.recipes.classification import ClassificationConfig, train_classification
from shared.data.formats import Example
from shared.ml.classification_data import load_sequence_classifier, read_labels
from shared.ml.materialize import materialize
from shared.planning.catalog import load_catalog
from shared.platform import storage_keys
from shared.platform.api_keys import KeyStore
from shared.platform.ids import new_id, new_job_id
from shared.platform.job_states import JobState
from shared.platform.job_store import JobStore
from shared.platform.queue import INFERENCE_QUEUE, listening_workers, queue
from shared.platform.records import DEFAULT_TENANT, JobRecord, LoraSettings, fine_tuned_model_id, now
from shared.platform.settings import Settings
from shared.platform.storage import Storage, storage_from_settings
from tests.api_fixtures import ADMIN_KEY, IDENTITY_CHAT
from tests.helpers import wait_for
from tests.live import LiveTunery, live_env

BASE = "tunery/tiny-chat"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


class NoHooks:
    def on_step(self, m: Any) -> None:
        pass

    def on_epoch_end(self, epoch: int, valid_metrics: dict | None) -> None:
        pass

    def should_stop(self) -> None:
        return None


@pytest.fixture(scope="module")
def base_dir(model_cache: Path) -> Path:
    """The built-in tiny chat model, built once into the session's model cache."""
    settings = Settings(model_cache_dir=model_cache)
    return materialize(load_catalog(settings)[BASE], settings)


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter (and tokenizer) on the tiny model with random, non-zero weights: it changes replies."""
    out = tmp_path_factory.mktemp("chat-adapter")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out / "adapter")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out / "tokenizer")
    return out


def sentiment(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(["negative", "positive"])
        word = rng.choice(["great", "lovely"] if label == "positive" else ["awful", "dull"])
        rows.append(Example("classification", f"line {i + 1}", text=f"it was {word}", label=label))
    return rows


@pytest.fixture(scope="module")
def classifiers(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny classifier per method, as the trainer saves them: adapter/ or model/, tokenizer/, labels.json."""
    trained = {}
    for method in ("lora", "full"):
        out = tmp_path_factory.mktemp(f"classifier-{method}")
        config = ClassificationConfig(
            model_dir=base_dir, output_dir=out, train_examples=sentiment(16, seed=1), valid_examples=None,
            n_epochs=1, batch_size=8, learning_rate=5e-3, max_seq_length=32, seed=0, method=method,
            lora_r=4, lora_alpha=8, lora_dropout=0.0, torch_threads=1,
        )  # fmt: skip
        train_classification(config, NoHooks())
        trained[method] = out
    return trained


@pytest.fixture
def settings(api_settings: Settings) -> Settings:
    return api_settings


@pytest.fixture
def storage(settings: Settings) -> Storage:
    return storage_from_settings(settings)


@pytest.fixture
def jobs(settings: Settings, storage: Storage) -> JobStore:
    return JobStore(Redis.from_url(settings.effective_redis_url), storage)


ADAPTER_LORA = LoraSettings(r=4, alpha=16, target_modules=["q_proj", "v_proj"])  # adapter_dir's


def publish(
    jobs: JobStore, storage: Storage, folders: dict[str, Path], *, method_type: str = "supervised",
    tenant: str = DEFAULT_TENANT, lora: LoraSettings = ADAPTER_LORA,
) -> JobRecord:  # fmt: skip
    """A succeeded job whose artifacts (`folders`: artifact name → folder or file) are in storage, with its
    fine-tuned model registered, as the trainer and evaluator leave it."""
    job_id = new_job_id()
    record = JobRecord(
        id=job_id, tenant=tenant, created_at=now(), model=BASE, training_file="file-test", seed=0,
        suffix="smoke", lora=lora, method_type=method_type, state=JobState.SUCCEEDED,
    )  # fmt: skip
    for name, path in folders.items():
        key = storage_keys.artifacts_prefix(tenant, job_id) + path.name + ("/" if path.is_dir() else "")
        if path.is_dir():
            storage.upload_directory(path, key)
        else:
            storage.upload_file(path, key)
        record.artifacts[name] = key
    record.fine_tuned_model = fine_tuned_model_id(record)
    jobs.create(record, "Created for a test")
    jobs.register_fine_tuned_model(record)
    return record


def publish_classifier(
    jobs: JobStore, storage: Storage, out: Path, tenant: str = DEFAULT_TENANT
) -> JobRecord:
    weights = "adapter" if (out / "adapter").exists() else "model"
    folders = {weights: out / weights, "tokenizer": out / "tokenizer", "labels": out / "labels.json"}
    return publish(jobs, storage, folders, method_type="classification", tenant=tenant)


def list_checkpoint(jobs: JobStore, record: JobRecord, step: int, weights: dict[str, str]) -> dict[str, Any]:
    """List a checkpoint of `record` as the trainer does; `weights`: its `adapter` or `state_prefix`."""
    checkpoint = {
        "id": new_id("ftckpt"), "object": "fine_tuning.job.checkpoint", "created_at": now(),
        "fine_tuned_model_checkpoint": f"{fine_tuned_model_id(record)}:ckpt-step-{step}",
        "fine_tuning_job_id": record.id, "step_number": step, "metrics": {"step": float(step)}, **weights,
    }  # fmt: skip
    jobs.add_checkpoint(record.id, checkpoint)
    return checkpoint


def store_state_checkpoint(
    storage: Storage, record: JobRecord, base_dir: Path, adapter: Path, workdir: Path
) -> str:
    """A full-state checkpoint's weights file holding `adapter` as training saves it (only the trainable
    tensors, named as in the training PeftModel); its storage prefix."""
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter, is_trainable=True
    )
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, workdir / "model.safetensors")
    prefix = storage_keys.checkpoint_prefix(record.tenant, record.id, 1, 4)
    storage.upload_file(workdir / "model.safetensors", prefix + "model.safetensors")
    return prefix


def chat_spec(model: str, job_id: str | None = None, **options: Any) -> dict[str, Any]:
    return {
        "tenant": DEFAULT_TENANT, "model": model, "job_id": job_id, "messages": MESSAGES, "max_tokens": 16,
        "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": [], **options,
    }  # fmt: skip


def transformers_greedy(model: torch.nn.Module, tokenizer: Any, max_new_tokens: int) -> dict[str, Any]:
    """What plain `transformers` generates greedily for MESSAGES with the model's own generation config."""
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    new = output[0, len(ids) :]
    return {
        "content": tokenizer.decode(new, skip_special_tokens=True),
        "prompt_tokens": len(ids),
        "completion_tokens": len(new),
    }


def test_a_catalog_model_replies_greedily_exactly_as_transformers_generates(
    settings: Settings, base_dir: Path
) -> None:
    result = chat_completion(chat_spec(BASE), settings, ModelCache(1))

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    expected = transformers_greedy(model, tokenizer, 16)
    assert {k: result[k] for k in expected} == expected
    assert result["completion_tokens"] == 16 and result["finish_reason"] == "length"  # random weights: no EOS


def test_a_fine_tuned_adapter_replies_as_the_base_model_with_that_adapter(
    settings: Settings, storage: Storage, jobs: JobStore, base_dir: Path, adapter_dir: Path
) -> None:
    record = publish(
        jobs, storage, {"adapter": adapter_dir / "adapter", "tokenizer": adapter_dir / "tokenizer"}
    )
    cache = ModelCache(2)

    tuned = chat_completion(chat_spec(record.fine_tuned_model, record.id), settings, cache)
    base = chat_completion(chat_spec(BASE), settings, cache)

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    expected = transformers_greedy(PeftModel.from_pretrained(model, adapter_dir / "adapter"), tokenizer, 16)
    assert {k: tuned[k] for k in expected} == expected
    assert tuned["content"] != base["content"]  # the adapter is really applied


def test_a_checkpoint_replies_with_its_adapter_whether_final_or_a_full_state_one(
    settings: Settings,
    storage: Storage,
    jobs: JobStore,
    base_dir: Path,
    adapter_dir: Path,
    tmp_path: Path,
) -> None:
    record = publish(
        jobs, storage, {"adapter": adapter_dir / "adapter", "tokenizer": adapter_dir / "tokenizer"}
    )
    state = store_state_checkpoint(storage, record, base_dir, adapter_dir / "adapter", tmp_path)
    periodic = list_checkpoint(jobs, record, 4, {"state_prefix": state, "resumable": True})
    final = list_checkpoint(jobs, record, 8, {"adapter": record.artifacts["adapter"]})
    cache = ModelCache(3)

    tuned = chat_completion(chat_spec(record.fine_tuned_model, record.id), settings, cache)
    answers = [
        chat_completion(
            chat_spec(c["fine_tuned_model_checkpoint"], record.id, checkpoint_id=c["id"]), settings, cache
        )
        for c in (periodic, final)
    ]
    assert answers == [tuned, tuned]  # the same adapter, from either kind of checkpoint
    assert cache.loads == 3 and periodic["id"] in cache and final["id"] in cache

    unlisted = chat_spec(f"{record.fine_tuned_model}:ckpt-step-4", record.id, checkpoint_id="ftckpt-gone")
    assert chat_completion(unlisted, settings, cache)["error"]["status"] == 404


def test_stop_strings_end_the_reply_and_a_seed_repeats_a_sampled_one(settings: Settings) -> None:
    cache = ModelCache(1)
    full = chat_completion(chat_spec(BASE), settings, cache)["content"]
    # An ASCII character some way into the greedy reply (the tiny model's bytes are random).
    at = next(i for i, c in enumerate(full) if i >= 2 and c.isascii() and c.isprintable())
    stopped = chat_completion(chat_spec(BASE, stop=["zz-never", full[at]]), settings, cache)
    assert stopped["content"] == full[: full.index(full[at])]
    assert stopped["finish_reason"] == "stop"
    assert stopped["completion_tokens"] < 16  # generation stopped early, not only the text cut

    sampled = [
        chat_completion(chat_spec(BASE, temperature=1.2, top_p=0.9, seed=seed), settings, cache)["content"]
        for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


def test_a_conversation_longer_than_the_context_is_a_400_naming_messages(settings: Settings) -> None:
    messages = [{"role": "user", "content": "word " * 200}]  # byte-level tokens: ~1000 > 512
    result = chat_completion(chat_spec(BASE, messages=messages), settings, ModelCache(1))
    assert result["error"]["status"] == 400
    assert result["error"]["code"] == "context_length_exceeded"
    assert result["error"]["param"] == "messages"


def test_a_catalog_model_whose_weights_are_missing_is_a_503_model_unavailable(
    settings: Settings, tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(f"models:\n  gone:\n    source: {tmp_path / 'no-such-model'}\n")
    result = chat_completion(
        chat_spec("gone"), settings.model_copy(update={"model_catalog": catalog}), ModelCache(1)
    )
    assert result["error"]["status"] == 503 and result["error"]["code"] == "model_unavailable"
    assert "no config.json" in result["error"]["message"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_classifier_answers_a_training_label_with_the_probability_of_a_direct_forward_pass(
    settings: Settings,
    storage: Storage,
    jobs: JobStore,
    base_dir: Path,
    classifiers: dict[str, Path],
    method: str,
) -> None:
    out = classifiers[method]
    record = publish_classifier(jobs, storage, out)
    texts = ["it was great", "honestly, after a long wait, it was dull", "it was lovely"]

    result = classify(
        {"tenant": DEFAULT_TENANT, "model": record.fine_tuned_model, "job_id": record.id, "input": texts},
        settings,
        ModelCache(1),
    )

    saved = read_labels(out)
    assert saved["method"] == method
    weights = {"adapter_dir": out / "adapter"} if method == "lora" else {"model_dir": out / "model"}
    model = load_sequence_classifier(
        base_dir, saved["labels"], pad_token_id=saved["pad_token_id"], trust_remote_code=False,
        dtype=torch.float32, **weights,
    ).eval()  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    truncated = {"truncation": True, "max_length": saved["max_seq_length"]}  # 32 tokens, as in training
    assert [row["index"] for row in result["data"]] == [0, 1, 2]
    for text, row in zip(texts, result["data"], strict=True):
        with torch.no_grad():  # one text at a time: no padding at all
            inputs = tokenizer(text, return_tensors="pt", **truncated)
            probabilities = model(**inputs).logits.softmax(-1)[0].tolist()
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        assert row["label"] == saved["labels"][best] and row["label"] in {"negative", "positive"}
        assert 0 < row["score"] <= 1
        assert row["score"] == pytest.approx(probabilities[best], abs=1e-5)
        assert list(row["scores"].values()) == pytest.approx(probabilities, abs=1e-5)
    assert result["prompt_tokens"] == sum(len(tokenizer(t, **truncated)["input_ids"]) for t in texts)


def test_the_cache_keeps_loaded_models_and_unloads_the_least_recently_used(
    settings: Settings, storage: Storage, jobs: JobStore, adapter_dir: Path
) -> None:
    record = publish(
        jobs, storage, {"adapter": adapter_dir / "adapter", "tokenizer": adapter_dir / "tokenizer"}
    )
    cache = ModelCache(1)

    first = chat_completion(chat_spec(BASE), settings, cache)
    loaded = cache.get(BASE, lambda: pytest.fail("the model should be cached"))
    second = chat_completion(chat_spec(BASE), settings, cache)
    assert cache.loads == 1 and first == second
    assert cache.get(BASE, lambda: None) is loaded  # the very same model object, not a reload

    chat_completion(chat_spec(record.fine_tuned_model, record.id), settings, cache)
    assert cache.loads == 2 and record.fine_tuned_model in cache and BASE not in cache


# -- the API ----------------------------------------------------------------------------------------------


def chat_body(model: str, **options: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, **options}


def test_the_api_refuses_unknown_foreign_and_mismatched_models_before_any_worker_is_asked(
    api: TestClient, settings: Settings, storage: Storage, jobs: JobStore, adapter_dir: Path
) -> None:
    chat = publish(
        jobs, storage, {"adapter": adapter_dir / "adapter", "tokenizer": adapter_dir / "tokenizer"}
    )
    classifier = publish(jobs, storage, {}, method_type="classification")
    foreign = publish(jobs, storage, {}, tenant="org-other")
    own_step = list_checkpoint(jobs, chat, 4, {"adapter": "x/"})["fine_tuned_model_checkpoint"]
    foreign_step = list_checkpoint(jobs, foreign, 4, {"adapter": "x/"})["fine_tuned_model_checkpoint"]
    classifier_step = list_checkpoint(jobs, classifier, 4, {"adapter": "x/"})["fine_tuned_model_checkpoint"]
    unlisted_step = f"{chat.fine_tuned_model}:ckpt-step-5"
    # The foreign job's name with this organization in it; this job's id with a name it does not list.
    made_up = [foreign_step.replace("org-other", DEFAULT_TENANT), own_step.replace(":smoke:", ":renamed:")]

    for model in ("no-such-model", foreign.fine_tuned_model, foreign_step, unlisted_step, *made_up):
        response = api.post("/v1/chat/completions", json=chat_body(model))
        assert response.status_code == 404
        assert response.json()["error"] == {
            "message": f"No such model: {model}", "type": "invalid_request_error", "param": "model",
            "code": "model_not_found",
        }  # fmt: skip
    response = api.post("/v1/classifications", json={"model": foreign.fine_tuned_model, "input": ["x"]})
    assert response.status_code == 404

    wrong = [
        ("/v1/chat/completions", chat_body(classifier.fine_tuned_model), "model", "/v1/classifications"),
        ("/v1/classifications", {"model": chat.fine_tuned_model, "input": "x"}, "model", "chat/completions"),
        ("/v1/classifications", {"model": BASE, "input": "x"}, "model", "method classification"),
        ("/v1/classifications", {"model": own_step, "input": "x"}, "model", "is a checkpoint"),
        ("/v1/chat/completions", chat_body(classifier_step), "model", "is a checkpoint"),
        ("/v1/chat/completions", chat_body(BASE, stream=True), "stream", "streaming"),
        (
            "/v1/chat/completions",
            chat_body(BASE, max_tokens=10_000),
            "max_tokens",
            "TUNERY_INFERENCE_MAX_TOKENS",
        ),
        ("/v1/chat/completions", chat_body(BASE, n=2), "n", "less than or equal to 1"),
        ("/v1/chat/completions", chat_body(BASE, tools=[]), "tools", "Extra inputs"),
        ("/v1/classifications", {"model": BASE, "input": ["a"] * 65}, "input", "TUNERY_INFERENCE_MAX_INPUTS"),
        ("/v1/classifications", {"model": BASE, "input": ["a", " "]}, "input", "text 1 is empty"),
    ]
    for path, body, param, words in wrong:
        response = api.post(path, json=body)
        error = response.json()["error"]
        assert response.status_code == 400, (path, body, error)
        assert error["param"] == param and words in error["message"], error
    assert Redis.from_url(settings.effective_redis_url).exists(f"rq:queue:{INFERENCE_QUEUE}") == 0


def test_without_an_answering_inference_worker_the_api_says_to_start_one(api_settings: Settings) -> None:
    redis = Redis.from_url(api_settings.effective_redis_url)
    app = create_app(api_settings.model_copy(update={"inference_timeout_seconds": 0.5}))
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as api:
        none_running = api.post("/v1/chat/completions", json=chat_body(BASE))
        assert none_running.status_code == 503
        assert "No inference worker is running" in none_running.json()["error"]["message"]
        assert "`tunery inference`" in none_running.json()["error"]["message"]

        # A worker registered on the queue that never takes the task (busy, or hung).
        silent = Worker([queue(redis, INFERENCE_QUEUE)], connection=redis, name="inference-silent")
        silent.register_birth()
        try:
            timed_out = api.post("/v1/chat/completions", json=chat_body(BASE))
        finally:
            silent.register_death()
        assert timed_out.status_code == 503
        assert timed_out.json()["error"]["code"] == "no_inference_worker"
        assert "within 0.5 s" in timed_out.json()["error"]["message"]
        assert "`tunery inference`" in timed_out.json()["error"]["message"]
        assert timed_out.headers["retry-after"] == "10"
    assert queue(redis, INFERENCE_QUEUE).count == 0  # the request was withdrawn, not left to run later


@pytest.mark.slow
def test_a_live_inference_worker_answers_the_openai_sdk_and_classifications_over_http(
    tmp_path: Path,
    redis_url: str,
    s3_server,
    bucket_storage,
    model_cache: Path,
    base_dir: Path,
    adapter_dir: Path,
    classifiers: dict[str, Path],
) -> None:
    env = live_env(
        tmp_path, redis_url,
        {
            "TUNERY_S3_BUCKET": bucket_storage.bucket,
            "TUNERY_S3_ENDPOINT_URL": s3_server.endpoint_url,
            "TUNERY_S3_ACCESS_KEY_ID": s3_server.access_key_id,
            "TUNERY_S3_SECRET_ACCESS_KEY": s3_server.secret_access_key,
            "TUNERY_MODEL_CACHE_DIR": str(model_cache),
            "TUNERY_TORCH_THREADS": "1",
        },
    )  # fmt: skip
    (tmp_path / "logs").mkdir()
    live = LiveTunery(env=env, base_url=f"http://127.0.0.1:{env['TUNERY_API_PORT']}", logs=tmp_path / "logs")
    redis = Redis.from_url(redis_url)
    jobs = JobStore(redis, bucket_storage)
    chat = publish(
        jobs, bucket_storage, {"adapter": adapter_dir / "adapter", "tokenizer": adapter_dir / "tokenizer"}
    )
    classifier = publish_classifier(jobs, bucket_storage, classifiers["lora"])
    _, other_key = KeyStore(redis).create("org-other", "member", "test")
    try:
        live.start("api")
        worker = live.start("inference")
        wait_for(lambda: listening_workers(redis, INFERENCE_QUEUE) > 0, 30, "inference worker", worker)
        sdk = OpenAI(base_url=f"{live.base_url}/v1", api_key=ADMIN_KEY, _strict_response_validation=True)

        completion = sdk.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=16, temperature=0)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        expected = transformers_greedy(model, tokenizer, 16)
        assert completion.object == "chat.completion" and completion.model == BASE
        assert completion.id.startswith("chatcmpl-")
        assert completion.choices[0].message.role == "assistant"
        assert completion.choices[0].message.content == expected["content"]
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage.prompt_tokens == expected["prompt_tokens"]
        assert completion.usage.total_tokens == expected["prompt_tokens"] + 16

        tuned = sdk.chat.completions.create(
            model=chat.fine_tuned_model, messages=MESSAGES, max_completion_tokens=4, temperature=0, seed=3
        )
        assert tuned.model == chat.fine_tuned_model and tuned.usage.completion_tokens == 4

        with pytest.raises(openai.NotFoundError):
            sdk.chat.completions.create(model="ft:nothing", messages=MESSAGES)
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.chat.completions.create(model=classifier.fine_tuned_model, messages=MESSAGES)
        assert refused.value.param == "model"

        with live.client() as client:
            texts = ["it was great", "it was dull"]
            response = client.post(
                "/v1/classifications", json={"model": classifier.fine_tuned_model, "input": texts}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["object"] == "list" and body["model"] == classifier.fine_tuned_model
            labels = read_labels(classifiers["lora"])["labels"]
            assert [row["index"] for row in body["data"]] == [0, 1]
            assert all(row["label"] in labels and 0 < row["score"] <= 1 for row in body["data"])
            assert body["usage"]["prompt_tokens"] > 0

            foreign = httpx.post(
                f"{live.base_url}/v1/classifications", headers={"Authorization": f"Bearer {other_key}"},
                json={"model": classifier.fine_tuned_model, "input": texts},
            )  # fmt: skip
            assert foreign.status_code == 404

            # An adapter that cannot load crashes the task: a 500, and the worker serves on.
            (tmp_path / "broken").mkdir()
            (tmp_path / "broken" / "adapter_config.json").write_text("{}")
            broken = publish(
                jobs, bucket_storage, {"adapter": tmp_path / "broken", "tokenizer": adapter_dir / "tokenizer"}
            )
            crashed = client.post("/v1/chat/completions", json=chat_body(broken.fine_tuned_model))
            assert crashed.status_code == 500
            assert crashed.json()["error"]["code"] == "internal_error"
            assert client.post("/v1/chat/completions", json=chat_body(BASE)).status_code == 200

        metrics = httpx.get(f"http://127.0.0.1:{env['TUNERY_INFERENCE_METRICS_PORT']}/metrics").text
        assert 'tunery_worker_tasks_total{outcome="succeeded",service="inference"} 4.0' in metrics
        assert 'tunery_worker_tasks_total{outcome="failed",service="inference"} 1.0' in metrics
        assert "tunery_inference_generated_tokens_total 28.0" in metrics  # 16 + 4 + 8
    finally:
        live.stop()


@pytest.mark.slow
def test_a_trained_jobs_checkpoints_answer_over_http_with_their_own_adapters_to_its_organization_only(
    live_factory, redis_url: str
) -> None:
    live = live_factory(redis_url, {"TUNERY_CHECKPOINT_KEEP": "10"})  # step 2's checkpoint is kept
    _, other_key = KeyStore(Redis.from_url(redis_url)).create("org-other", "member", "test")
    rows = b"".join(IDENTITY_CHAT.read_bytes().splitlines(keepends=True)[:10])
    hyperparameters = {"n_epochs": 1, "batch_size": 1}
    with live.client() as client:
        file_id = client.post(
            "/v1/files", files={"file": ("train.jsonl", rows)}, data={"purpose": "fine-tune"}
        ).json()["id"]
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": BASE, "training_file": file_id, "seed": 7, "checkpoint_every_steps": 2,
                "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
            },
        ).json()  # fmt: skip
    live.start("inference")  # while the job trains
    done, _ = live.wait_for_job(job["id"], {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded", done["error"]

    with live.client() as client:
        listed = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", params={"limit": 100}).json()
        final = listed["data"][0]  # newest first
        early = next(c for c in listed["data"] if c["step_number"] == 2)
        assert final["step_number"] == done["progress"]["step"] and "resumable" not in final
        assert early["resumable"]  # a full-state checkpoint, not a PEFT adapter folder

        def ask(model: str) -> str:
            response = client.post("/v1/chat/completions", json=chat_body(model, max_tokens=16), timeout=120)
            assert response.status_code == 200, response.text
            assert response.json()["model"] == model
            return response.json()["choices"][0]["message"]["content"]

        tuned = ask(done["fine_tuned_model"])
        assert ask(final["fine_tuned_model_checkpoint"]) == tuned  # the final checkpoint is the model
        # Step 2's adapter: neither the base's answer (random bytes) nor the tuned one's (it learnt spaces).
        assert ask(early["fine_tuned_model_checkpoint"]) not in {tuned, ask(BASE)}

    foreign = httpx.post(
        f"{live.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {other_key}"},
        json=chat_body(early["fine_tuned_model_checkpoint"]), timeout=30,
    )  # fmt: skip
    assert foreign.status_code == 404 and foreign.json()["error"]["param"] == "model"
