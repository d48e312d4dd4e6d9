"""The token cache: exact round trips on both storage backends, keys that change with every input, and
entries that are ignored unless they are complete and intact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from shared.ml import token_cache
from shared.ml.builtin_models import build_tiny_chat_model
from shared.ml.chat_data import TokenizedExample, tokenize_chat
from shared.platform.storage import LocalStorage, Storage, StorageError

SHA = "0" * 64


def qa(question: str, answer: str, **assistant: int) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer, **assistant}]


CONVERSATIONS = [
    qa("What is 2+2?", "4"),
    [{"role": "system", "content": "Réponds en français. 🙂"}, *qa("Ciel ?", "Bleu")],
    qa("A long question " * 10, "Answer"),  # truncated at 96 tokens
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def examples(tokenizer: PreTrainedTokenizerBase) -> list[TokenizedExample]:
    examples = [tokenize_chat(tokenizer, m, 96) for m in CONVERSATIONS]
    examples.append(tokenize_chat(tokenizer, qa("Hi", "Hello"), 96, train_on_inputs=True))
    assert [e.truncated for e in examples] == [False, False, True, False]
    return examples


def test_round_trip_is_exact(storage: Storage, examples: list[TokenizedExample]) -> None:
    key = "a" * 64
    assert token_cache.load(storage, key) is None

    token_cache.save(storage, key, examples)

    assert storage.exists(f"cache/tokenized/{key}.safetensors")
    assert token_cache.load(storage, key) == examples
    token_cache.save(storage, "b" * 64, [])
    assert token_cache.load(storage, "b" * 64) == []
    tenant = "tenants/org-1/cache/tokenized/"
    token_cache.save(storage, key, examples[:1], prefix=tenant)
    assert storage.exists(f"{tenant}{key}.safetensors")
    assert token_cache.load(storage, key, prefix=tenant) == examples[:1]
    assert token_cache.load(storage, key) == examples  # another prefix, another entry


def test_the_key_changes_with_every_input(
    tokenizer: PreTrainedTokenizerBase, model_dir: Path, tmp_path: Path
) -> None:
    base = token_cache.cache_key(SHA, tokenizer, 512, False)
    # The same tokenizer loaded from elsewhere (another worker's model cache) gives the same key.
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    assert token_cache.cache_key(SHA, AutoTokenizer.from_pretrained(copy), 512, False) == base

    other_template = AutoTokenizer.from_pretrained(model_dir)
    other_template.chat_template = tokenizer.chat_template.replace("'\\n'", "'\\n\\n'")
    other_vocab = AutoTokenizer.from_pretrained(model_dir)
    other_vocab.add_tokens(["<|tool|>"])
    keys = [
        base,
        token_cache.cache_key("1" * 64, tokenizer, 512, False),
        token_cache.cache_key(SHA, other_template, 512, False),
        token_cache.cache_key(SHA, other_vocab, 512, False),
        token_cache.cache_key(SHA, tokenizer, 1024, False),
        token_cache.cache_key(SHA, tokenizer, 512, True),
        token_cache.cache_key(SHA, tokenizer, 512, False, eos_token_ids={257}),
        token_cache.cache_key(SHA, tokenizer, 512, False, namespace="org-1"),
    ]
    assert len(set(keys)) == len(keys)
    assert all(len(key) == 64 and int(key, 16) >= 0 for key in keys)


def test_data_checksum_follows_the_conversations() -> None:
    digest = token_cache.data_sha256(CONVERSATIONS)
    assert token_cache.data_sha256([list(m) for m in CONVERSATIONS]) == digest
    assert token_cache.data_sha256(CONVERSATIONS[:2]) != digest
    assert (
        token_cache.data_sha256([*CONVERSATIONS[:2], qa("A long question " * 10, "Answer", weight=0)])
        != digest
    )


def corruptions(data: bytes, examples: list[TokenizedExample]) -> dict[str, bytes]:
    flipped = bytearray(data)
    flipped[-3] ^= 0x01  # a token id in the last array's neighbourhood: parses, fails the checksum
    return {
        "empty": b"",
        "garbage": b"\x00not a safetensors file" * 10,
        "truncated": data[: len(data) // 2],
        "header only": data[:100],
        "bit flip": bytes(flipped),
        "another key's entry": token_cache.encode("c" * 64, examples),
    }


def test_a_corrupt_or_partial_entry_is_ignored(storage: Storage, examples: list[TokenizedExample]) -> None:
    key = "d" * 64
    data = token_cache.encode(key, examples)
    for what, bad in corruptions(data, examples).items():
        storage.put_bytes(token_cache.storage_key(key), bad)
        assert token_cache.load(storage, key) is None, what
    token_cache.save(storage, key, examples)  # a miss recomputes and overwrites
    assert token_cache.load(storage, key) == examples


def test_inconsistent_arrays_with_a_valid_checksum_are_refused(examples: list[TokenizedExample]) -> None:
    forged = [*examples[:1], TokenizedExample([1, 2, 3], [-100, 7, 3], False)]  # label 7 on token 2
    with pytest.raises(ValueError, match="labels"):
        token_cache.decode("e" * 64, token_cache.encode("e" * 64, forged))


class BrokenStorage(LocalStorage):
    def get_bytes(self, key: str) -> bytes:
        raise StorageError("connection refused")

    def put_bytes(self, key: str, data: bytes) -> None:
        raise StorageError("connection refused")


def test_storage_failures_are_misses_not_errors(tmp_path: Path, examples: list[TokenizedExample]) -> None:
    broken = BrokenStorage(tmp_path / "storage")
    token_cache.save(broken, "f" * 64, examples)  # logged, not raised
    assert token_cache.load(broken, "f" * 64) is None
