"""Loading base models the same way in the trainer and the evaluator."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def weights_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (half the memory, no loss scaling), fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_causal_lm(model_dir: Path, *, trust_remote_code: bool, dtype: torch.dtype) -> torch.nn.Module:
    """safetensors only, and custom model code only when the operator allows it.

    The dtype is explicit: transformers 5 otherwise loads the checkpoint's own (often bf16 on CPU).
    """
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def generation_eos_ids(
    model_dir: Path, tokenizer: PreTrainedTokenizerBase, *, trust_remote_code: bool
) -> set[int]:
    """The ids generation stops on, found as `from_pretrained` finds the model's generation_config."""
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: generation falls back to config.json
        model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        generation = GenerationConfig.from_model_config(model_config)
    eos = generation.eos_token_id
    if eos is None:
        return {tokenizer.eos_token_id}
    return {eos} if isinstance(eos, int) else set(eos)
