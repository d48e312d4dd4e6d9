"""The built-in tiny chat models: complete, offline, deterministic model directories."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.ml.builtin_models import ARCHITECTURES, build_tiny_chat_model
from shared.ml.chat_data import check_eos

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Héllo, wörld? 😀"},
    {"role": "assistant", "content": "Hi!\n  Indented line."},
]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_loads_offline_and_generates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model_dir = build_tiny_chat_model(tmp_path / arch, arch=arch)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(CHAT[:2], add_generation_prompt=True, return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)

    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tokenizer)
    assert output.shape == (1, prompt["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_chat_template_round_trips_through_the_tokenizer(tmp_path: Path, arch: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_chat_model(tmp_path / arch, arch=arch))

    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)

    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHéllo, wörld? 😀<|im_end|>\n"
        "<|im_start|>assistant\nHi!\n  Indented line.<|im_end|>\n"
    )
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


def test_turns_end_with_the_generation_eos(tmp_path: Path) -> None:
    model_dir = build_tiny_chat_model(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    assert tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert check_eos(tokenizer, {model.generation_config.eos_token_id}) == []


def test_same_seed_gives_identical_weights(tmp_path: Path) -> None:
    first = load_file(build_tiny_chat_model(tmp_path / "a", seed=7) / "model.safetensors")
    second = load_file(build_tiny_chat_model(tmp_path / "b", seed=7) / "model.safetensors")
    other = load_file(build_tiny_chat_model(tmp_path / "c", seed=8) / "model.safetensors")

    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_building_again_keeps_the_existing_model(tmp_path: Path) -> None:
    model_dir = build_tiny_chat_model(tmp_path / "m")
    weights = model_dir / "model.safetensors"
    built_at = weights.stat().st_mtime_ns

    assert build_tiny_chat_model(tmp_path / "m") == model_dir
    assert weights.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left behind


def test_concurrent_builds_of_one_model_both_succeed(tmp_path: Path) -> None:
    start = threading.Barrier(2)

    def build() -> Path:
        start.wait()
        return build_tiny_chat_model(tmp_path / "m")

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: build(), range(2)))

    assert results == [tmp_path / "m", tmp_path / "m"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.model_type == "llama"
