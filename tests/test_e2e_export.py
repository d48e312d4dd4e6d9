"""Export on a live Tunery: a merged model that transformers loads alone, a model card, and the
artifacts as one streamed archive."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tests.api_fixtures import IDENTITY_CHAT
from tests.live import LiveTunery

pytestmark = pytest.mark.slow


def test_the_merged_export_reproduces_the_adapter_and_ships_with_a_model_card(
    live: LiveTunery, tmp_path: Path
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.ml.builtin_models import build_tiny_chat_model

    with live.client() as client:
        file_id = client.post(
            "/v1/files",
            files={"file": ("identity.jsonl", IDENTITY_CHAT.read_bytes())},
            data={"purpose": "fine-tune"},
        ).json()["id"]
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tunery/tiny-chat", "training_file": file_id, "suffix": "export",
                  "hyperparameters": {"n_epochs": 2}, "export_merged": True},
        ).json()  # fmt: skip
    done, _ = live.wait_for_job(job["id"], {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded", done["error"]
    with live.client() as client:
        listed = {f["path"] for f in client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts").json()["data"]}
        archive = client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/archive")
    assert archive.headers["content-type"] == "application/x-tar"
    assert {
        "adapter/adapter_model.safetensors",
        "merged/model.safetensors",
        "README.md",
        "evaluation.json",
    } <= listed
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        assert set(tar.getnames()) == listed
        tar.extractall(tmp_path / "export", filter="data")
    export = tmp_path / "export"

    card = (export / "README.md").read_text()
    assert done["fine_tuned_model"] in card
    assert "| loss |" in card and "Verdict: **improved**" in card
    assert "Intended use and limitations" in card

    tokenizer = AutoTokenizer.from_pretrained(export / "merged")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    base = AutoModelForCausalLM.from_pretrained(build_tiny_chat_model(tmp_path / "base", arch="llama"))
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(export / "merged")(**inputs).logits
        adapter_logits = PeftModel.from_pretrained(base, export / "adapter")(**inputs).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)
