"""Offline base models: tiny chat models built from a config, so a fresh machine can run a real job.

Nothing here downloads anything. The models are random (untrained) but complete Hugging Face model
directories: `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(directory)` load them offline, and the
chat template ends assistant turns with the EOS that generation stops on.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, PretrainedConfig, Qwen2Config

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = (IM_START, IM_END, PAD)

# ChatML, as used by Qwen: every turn ends with <|im_end|>, the EOS the model must learn to generate.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ARCHITECTURES: dict[str, type[PretrainedConfig]] = {"llama": LlamaConfig, "qwen2": Qwen2Config}
MAX_POSITIONS = 2048

# Every file a finished build has; the directory appears only once all are written (atomic rename).
_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def build_tiny_chat_model(directory: Path, *, arch: str = "llama", seed: int = 0) -> Path:
    """Materialise a tiny random chat model at `directory` (no-op when it is already there).

    Built in a temporary directory next to `directory` and renamed into place, so processes racing to
    build the same model never see a half-written one. Deterministic for a given `arch` and `seed`.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    directory = Path(directory)
    if _is_complete(directory):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        _write_model(tmp, arch=arch, seed=seed)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; other service users must read the model too
        try:
            tmp.rename(directory)
        except OSError:
            if not _is_complete(directory):  # not a lost race: something else occupies the path
                raise FileExistsError(f"{directory} exists and is not a built model") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE with the 256 byte tokens (id = byte value, no merges) and the ChatML specials."""
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def _write_model(directory: Path, *, arch: str, seed: int) -> None:
    tokenizer = build_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    eos_id, pad_id = tokenizer.token_to_id(IM_END), tokenizer.token_to_id(PAD)
    # Written by hand rather than by transformers' save_pretrained, which in 5.x moves the template to
    # chat_template.jinja; keeping it in tokenizer_config.json also serves older loaders.
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": IM_END,
            "pad_token": PAD,
            "unk_token": None,
            "model_max_length": MAX_POSITIONS,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        directory / "special_tokens_map.json",
        {"eos_token": IM_END, "pad_token": PAD, "additional_special_tokens": [IM_START, IM_END]},
    )

    config = ARCHITECTURES[arch](
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        # Wider than the usual 0.02: the frozen random output layer must be able to produce peaked
        # logits, or a LoRA adapter on a model this small can barely lower the loss.
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):  # deterministic init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(directory)


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _FILES)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in mapping)
    mapping.update({b: chr(256 + i) for i, b in enumerate(others)})
    return mapping
