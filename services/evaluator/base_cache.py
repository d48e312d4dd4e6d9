"""The base model's side of a chat evaluation, computed once and reused.

Every job on the same base model and validation rows scores the same untouched base model the same way;
only the fine-tuned side differs. So the base side (token metrics overall and per group, its greedy
replies) is stored in the tenant's storage under a digest of everything it depends on: the catalog
model (id, source and a fingerprint of its files), the validation rows and their groups, the tokenizer
and its chat template, max_seq_length, the generation settings, the device and dtype, the library
versions and CACHE_VERSION. Any change gives another digest, so a stale entry is never looked up.

An entry is one JSON object written with a single put (atomic in local storage and in S3). It is used
only if it parses, names the same digest and inputs, and has the shape the report needs; anything else is
ignored and computed again (and then overwritten).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.ml.chat_data import Messages
from shared.platform import storage_keys
from shared.platform.storage import ObjectNotFound, Storage

log = logging.getLogger(__name__)

# Bump when anything that shapes the base side's figures changes (metrics, generation, tokenization).
CACHE_VERSION = 1
TOKEN_FIELDS = ("loss", "perplexity", "mean_token_accuracy", "n_tokens")
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx"})
# Files a slow tokenizer may read, whatever the model directory holds besides.
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
        "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt",
        "tokenizer.model", "spiece.model",
    }
)  # fmt: skip
SAMPLE_BYTES = 1 << 20  # a large file is fingerprinted by its size and its first and last MiB


@dataclass
class ModelScores:
    """One model's results: token metrics overall and per group, and its replies to the generation cases."""

    tokens: dict[str, float]  # loss, perplexity, mean_token_accuracy, n_tokens
    tokens_by_group: dict[str, dict[str, float] | None]  # None: the group has no trainable token
    replies: list[str]
    from_cache: bool = False  # read from the base-results cache rather than computed here


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(SAMPLE_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(model_dir: Path) -> dict[str, str]:
    """Each file's name and a digest: small files whole, weights (which may be many GB) by their size and
    first and last MiB, enough to tell one checkpoint from another without reading it all."""
    files: dict[str, str] = {}
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        name = path.relative_to(model_dir).as_posix()
        size = path.stat().st_size
        if path.suffix not in WEIGHT_SUFFIXES or size <= 2 * SAMPLE_BYTES:
            files[name] = _sha256_file(path)
            continue
        digest = hashlib.sha256(str(size).encode())
        with open(path, "rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            f.seek(size - SAMPLE_BYTES)
            digest.update(f.read(SAMPLE_BYTES))
        files[name] = f"sampled:{digest.hexdigest()}"
    return files


def tokenizer_fingerprint(tokenizer: Any, tokenizer_dir: Path) -> str:
    """What the tokenizer does rather than how its files are laid out, so that a job's re-saved tokenizer
    and the base model's own match when they tokenize and template alike: a fast tokenizer's canonical
    serialization (vocabulary, merges, normalizer, added tokens), else its files; with the chat template
    and the special tokens either way."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(
            {
                path.name: _sha256_file(path)
                for path in sorted(tokenizer_dir.iterdir())
                if path.is_file() and path.name in TOKENIZER_FILES
            }
        )
    described = {
        "class": type(tokenizer).__name__,
        "body": hashlib.sha256(body.encode()).hexdigest(),
        "chat_template": tokenizer.chat_template,
        "special_tokens": {name: str(token) for name, token in tokenizer.special_tokens_map.items()},
    }
    return digest_of(described)


def rows_digest(conversations: Sequence[Messages], groups: Sequence[str | None]) -> str:
    """The validation rows as scored (after redaction) with their groups."""
    body = json.dumps([conversations, groups], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


def digest_of(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@dataclass
class BaseCache:
    """One entry of the cache: where it lives and the inputs it must have been computed from."""

    storage: Storage
    tenant: str
    inputs: dict[str, Any]

    @property
    def digest(self) -> str:
        return digest_of(self.inputs)

    @property
    def key(self) -> str:
        return storage_keys.base_evaluation_key(self.tenant, self.digest)

    def load(self, groups: Sequence[str], n_replies: int) -> ModelScores | None:
        """The stored base side, or None when there is none or it is not trustworthy (logged): it must
        name this digest and these inputs, and hold token figures for exactly these groups and one reply
        per generation case."""
        try:
            entry = json.loads(self.storage.get_bytes(self.key))
            scores = _parse(entry, self.digest, self.inputs, set(groups), n_replies)
        except ObjectNotFound:
            return None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("ignoring the cached base results %s: %s", self.key, exc)
            return None
        return scores

    def store(self, scores: ModelScores) -> None:
        entry = {
            "version": CACHE_VERSION,
            "digest": self.digest,
            "inputs": self.inputs,
            "tokens": scores.tokens,
            "tokens_by_group": scores.tokens_by_group,
            "replies": scores.replies,
        }
        self.storage.put_bytes(self.key, json.dumps(entry, ensure_ascii=False).encode())


def _parse(entry: Any, digest: str, inputs: dict[str, Any], groups: set[str], n_replies: int) -> ModelScores:
    if entry.get("version") != CACHE_VERSION or entry["digest"] != digest or entry["inputs"] != inputs:
        raise ValueError("it was computed from other inputs")
    tokens = _token_figures(entry["tokens"])
    by_group = entry["tokens_by_group"]
    if set(by_group) != groups:
        raise ValueError(f"it holds groups {sorted(by_group)}, not {sorted(groups)}")
    replies = entry["replies"]
    if not isinstance(replies, list) or len(replies) != n_replies:
        raise ValueError(f"it holds {len(replies)} replies, not {n_replies}")
    if not all(isinstance(reply, str) for reply in replies):
        raise ValueError("a reply is not text")
    figures = {group: None if value is None else _token_figures(value) for group, value in by_group.items()}
    return ModelScores(tokens, figures, list(replies), from_cache=True)


def _token_figures(value: Any) -> dict[str, float]:
    figures = {field: value[field] for field in TOKEN_FIELDS}
    for field, number in figures.items():
        if isinstance(number, bool) or not isinstance(number, int | float) or math.isnan(number):
            raise ValueError(f"{field} is {number!r}")
    return figures
