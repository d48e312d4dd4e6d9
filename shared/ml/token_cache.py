"""Tokenized datasets kept in object storage, so a second job (or a retry, or a sweep trial) on the same
data and tokenizer does not tokenize again.

An entry is keyed by everything its tokens and labels depend on: the data's checksum, the tokenizer (its
full serialized form: vocabulary, merges, normalizer, added tokens; and its settings), the chat template,
the end-of-turn ids, the sequence length, `train_on_inputs`, the versions of transformers and tokenizers,
and `TOKENIZATION_VERSION` (bump it whenever `shared.ml.chat_data.tokenize_chat` changes what it produces).

Entries are safetensors files (no pickle: loading one runs no code) at `<prefix><key>.safetensors`
(`cache/tokenized/` unless the caller gives a prefix, e.g. per tenant), holding the concatenated token
ids and labels (int32), the offsets of each example (int64) and the truncated flags (uint8), with the
key, the example count and a SHA-256 of the arrays in the metadata. Entries hold the data itself (token
ids decode back to the text): they are derived data, to delete with the data they came from. An
entry that is missing, unreadable, truncated, for another key, inconsistent or fails its checksum is
ignored (the caller tokenizes again and overwrites it), never trusted. The cache never fails a job:
storage errors are logged and treated as a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import tokenizers
import transformers
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors
from transformers import PreTrainedTokenizerBase

from shared.ml.chat_data import IGNORE_INDEX, Messages, TokenizedExample, keep_trainable, tokenize_all
from shared.platform.storage import ObjectNotFound, Storage, StorageError

log = logging.getLogger(__name__)

FORMAT = "tunery-tokenized-v1"
TOKENIZATION_VERSION = 1  # bump when tokenize_chat's output for the same inputs changes
PREFIX = "cache/tokenized/"
_ARRAYS = ("input_ids", "labels", "offsets", "truncated")
# Tokenizer settings that name where it was loaded from, not how it tokenizes.
_LOCATION_KWARGS = {"name_or_path", "is_local", "local_files_only", "cache_dir", "chat_template"}


def storage_key(key: str, prefix: str = PREFIX) -> str:
    """Where the entry of `key` is stored; `prefix` (ending in "/") may be per tenant, e.g.
    `tenants/<org>/cache/tokenized/`, so that deleting a tenant's data deletes its entries too."""
    if not prefix.endswith("/"):
        raise ValueError(f"prefix must end with '/': {prefix!r}")
    return f"{prefix}{key}.safetensors"


def data_sha256(conversations: Sequence[Messages]) -> str:
    """A checksum of parsed conversations: the identity of a dataset that is not a whole stored file
    (e.g. the training part of a held-out split), usable as `cache_key`'s `file_sha256`."""
    digest = hashlib.sha256(b"tunery-conversations-v1\n")
    for messages in conversations:
        line = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
        digest.update(line.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of what makes this tokenizer tokenize as it does, wherever it was loaded from."""
    parts: dict[str, Any] = {"class": type(tokenizer).__name__}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    sp_model = getattr(tokenizer, "sp_model", None)
    if backend is not None:  # the whole Rust tokenizer: model, vocabulary, merges, normalizer, specials
        parts["backend"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
    elif sp_model is not None and hasattr(sp_model, "serialized_model_proto"):
        parts["sentencepiece"] = hashlib.sha256(sp_model.serialized_model_proto()).hexdigest()
    else:
        parts["vocab"] = hashlib.sha256(
            json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
        ).hexdigest()
    parts["chat_template"] = tokenizer.chat_template
    parts["special_ids"] = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    parts["settings"] = {
        k: v
        for k, v in tokenizer.init_kwargs.items()
        if k not in _LOCATION_KWARGS and not k.endswith("_file") and not k.endswith("_files")
    }
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(
    file_sha256: str,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    train_on_inputs: bool,
    *,
    eos_token_ids: Collection[int] | None = None,
    namespace: str = "",
) -> str:
    """The cache key (64 hex digits) of a dataset tokenized with these settings.

    `file_sha256`: the data's checksum (a stored file's sha256, or `data_sha256(conversations)`).
    `eos_token_ids`: the end-of-turn ids passed to `tokenize_chat` (None: the tokenizer's EOS).
    `namespace`: e.g. the tenant, to keep one organisation's entries (and cache hits) apart from another's.
    """
    parts = {
        "format": FORMAT,
        "tokenization": TOKENIZATION_VERSION,
        "data": file_sha256,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "eos_token_ids": sorted(eos_token_ids) if eos_token_ids is not None else None,
        "max_seq_length": int(max_seq_length),
        "train_on_inputs": bool(train_on_inputs),
        "namespace": namespace,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def encode(key: str, examples: Sequence[TokenizedExample]) -> bytes:
    """The safetensors bytes of an entry."""
    lengths = [len(example.input_ids) for example in examples]
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if any(len(example.labels) != n for example, n in zip(examples, lengths, strict=True)):
        raise ValueError("every example needs one label per token")
    ids = np.asarray([t for example in examples for t in example.input_ids], dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 2**31):
        raise ValueError("token ids do not fit in int32")
    arrays = {
        "input_ids": ids.astype(np.int32),
        "labels": np.asarray([t for example in examples for t in example.labels], dtype=np.int32),
        "offsets": offsets,
        "truncated": np.asarray([example.truncated for example in examples], dtype=np.uint8),
    }
    metadata = {"format": FORMAT, "key": key, "n_examples": str(len(examples)), "sha256": _digest(arrays)}
    return save_safetensors(arrays, metadata=metadata)


def decode(key: str, data: bytes) -> list[TokenizedExample]:
    """The examples of an entry; ValueError when it is not a complete, consistent entry for `key`."""
    if len(data) < 8:
        raise ValueError("too short for a safetensors header")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > len(data) - 8:
        raise ValueError("header runs past the end (truncated entry)")
    metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
    if metadata.get("format") != FORMAT or metadata.get("key") != key:
        raise ValueError("not an entry of this format and key")
    arrays = load_safetensors(data)
    if sorted(arrays) != sorted(_ARRAYS):
        raise ValueError(f"unexpected arrays {sorted(arrays)}")
    ids, labels, offsets, truncated = (arrays[name] for name in _ARRAYS)
    expected = {"input_ids": np.int32, "labels": np.int32, "offsets": np.int64, "truncated": np.uint8}
    if any(arrays[name].dtype != dtype or arrays[name].ndim != 1 for name, dtype in expected.items()):
        raise ValueError("unexpected dtypes or shapes")
    n = int(metadata.get("n_examples", -1))
    if len(offsets) != n + 1 or len(truncated) != n or len(ids) != len(labels):
        raise ValueError("array lengths disagree with the example count")
    if offsets[0] != 0 or offsets[-1] != len(ids) or np.any(np.diff(offsets) < 0):
        raise ValueError("offsets are not a partition of the tokens")
    if np.any(truncated > 1) or not np.all((labels == IGNORE_INDEX) | (labels == ids)):
        raise ValueError("labels are neither ignored nor the tokens")
    if metadata.get("sha256") != _digest(arrays):
        raise ValueError("checksum mismatch")
    id_lists, label_lists, bounds = ids.tolist(), labels.tolist(), offsets.tolist()
    return [
        TokenizedExample(id_lists[a:b], label_lists[a:b], bool(t))
        for a, b, t in zip(bounds[:-1], bounds[1:], truncated.tolist(), strict=True)
    ]


def load(storage: Storage, key: str, *, prefix: str = PREFIX) -> list[TokenizedExample] | None:
    """The cached examples, or None when there is no usable entry (missing, corrupt, unreachable)."""
    try:
        data = storage.get_bytes(storage_key(key, prefix))
    except ObjectNotFound:
        return None
    except StorageError as exc:
        log.warning("token cache unavailable, tokenizing instead: %s", exc)
        return None
    try:
        return decode(key, data)
    except Exception as exc:  # any unreadable entry is a miss, whatever the parser raised
        log.warning("ignoring corrupt token cache entry %s: %s", storage_key(key, prefix), exc)
        return None


def save(storage: Storage, key: str, examples: Sequence[TokenizedExample], *, prefix: str = PREFIX) -> None:
    """Store the examples under `key` (replacing any entry); a failure is logged, never raised."""
    try:
        storage.put_bytes(storage_key(key, prefix), encode(key, examples))
    except (StorageError, ValueError) as exc:
        log.warning("could not store token cache entry %s: %s", storage_key(key, prefix), exc)


def tokenize_cached(
    storage: Storage,
    prefix: str,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Messages],
    max_seq_length: int,
    *,
    eos_token_ids: Collection[int],
    dataset: str,
    train_on_inputs: bool,
    sources: list[str] | None,
) -> tuple[list[TokenizedExample], list[str]]:
    """`chat_data.tokenize_dataset` through the cache: an entry holds every example, skipped ones too, so
    the checks (`keep_trainable`) run either way."""
    key = cache_key(
        data_sha256(conversations), tokenizer, max_seq_length, train_on_inputs, eos_token_ids=eos_token_ids
    )
    examples = load(storage, key, prefix=prefix)
    if examples is not None and len(examples) == len(conversations):
        log.info("%s data: %d tokenized examples from the cache (%s)", dataset, len(examples), key)
    else:
        examples = tokenize_all(
            tokenizer, conversations, max_seq_length, eos_token_ids=eos_token_ids, dataset=dataset,
            train_on_inputs=train_on_inputs, sources=sources,
        )  # fmt: skip
        save(storage, key, examples, prefix=prefix)
    return keep_trainable(examples, conversations, dataset=dataset, sources=sources)


def _digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in _ARRAYS:
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
