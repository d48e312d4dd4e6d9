"""Exports a serving stack can load as it is: the LoRA adapter merged into its base model."""

from __future__ import annotations

import shutil
from pathlib import Path

from peft import PeftModel

from shared.ml.model_loading import default_device, load_causal_lm, weights_dtype


def merge_adapter(
    base_dir: Path, adapter_dir: Path, tokenizer_dir: Path, out_dir: Path, *, trust_remote_code: bool
) -> Path:
    """Base + adapter → one model folder (safetensors, config, generation config, tokenizer) that
    `transformers` and vLLM load without peft. Merged in the base's training dtype."""
    device = default_device()
    base = load_causal_lm(base_dir, trust_remote_code=trust_remote_code, dtype=weights_dtype(device))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, out_dir / item.name)
    return out_dir
