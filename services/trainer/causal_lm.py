"""What the recipes that tune a causal LM with LoRA on chat-templated data share before their loop: the
tokenizer and its stop tokens, checked, and the data tokenized before the weights load (minutes for a large
model, so bad data fails first); then the model with its adapter."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from accelerate import Accelerator
from peft import PeftModel, get_peft_model
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from services.trainer.driver import TrainConfig, lora_config
from shared.ml.chat_data import check_eos
from shared.ml.model_loading import generation_eos_ids, load_causal_lm, weights_dtype

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ChatData:
    """A recipe's examples, tokenized with the model's chat template."""

    tokenizer: PreTrainedTokenizerBase
    eos_ids: list[int]  # the tokens that end a turn
    pad_id: int
    train: list[Any]
    valid: list[Any]
    warnings: list[str]  # the stop token's and the data's, logged once


def chat_data(
    config: TrainConfig, tokenize: Callable[..., tuple[list[T], list[str]]], **options: Any
) -> ChatData:
    """`tokenize(tokenizer, examples, max_length=, eos_token_ids=, dataset=, **options)` on the training and
    validation examples, after checking the tokenizer's stop token; the warnings are logged."""
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir, trust_remote_code=config.trust_remote_code)
    eos_ids = generation_eos_ids(config.model_dir, tokenizer, trust_remote_code=config.trust_remote_code)
    warnings = check_eos(tokenizer, eos_ids)
    common = dict(max_length=config.max_seq_length, eos_token_ids=eos_ids, **options)
    train, train_warnings = tokenize(tokenizer, config.train_examples, **common)
    valid, valid_warnings = tokenize(tokenizer, config.valid_examples or [], dataset="validation", **common)
    warnings += train_warnings + valid_warnings
    for warning in warnings:
        log.warning(warning)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ChatData(tokenizer, eos_ids, pad_id, train, valid, warnings)


def lora_causal_lm(config: TrainConfig, accelerator: Accelerator) -> PeftModel:
    """The base model in the device's weights dtype, with a fresh LoRA adapter on it."""
    model = load_causal_lm(
        config.model_dir, trust_remote_code=config.trust_remote_code, dtype=weights_dtype(accelerator.device)
    )
    return get_peft_model(model, lora_config(config))
