"""What the estimates need to know about a base model, read from its files without loading it.

Parameter counts come from the safetensors headers (a JSON header per file), so a 7B model is
measured in milliseconds and without torch.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelFacts:
    n_params: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int | None

    @property
    def lora_linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the linear layers LoRA adapts per decoder layer ("all-linear", Llama-like)."""
        h, i = self.hidden_size, self.intermediate_size
        return [(h, h)] * 4 + [(h, i), (h, i), (i, h)]

    def lora_params(self, r: int) -> int:
        return self.num_layers * sum(r * (a + b) for a, b in self.lora_linear_shapes)


def read_model_facts(model_dir: Path) -> ModelFacts:
    config = json.loads((model_dir / "config.json").read_text())
    config = config.get("text_config", config)  # multimodal wrappers keep the LM's config inside
    n_params = sum(_safetensors_params(p) for p in sorted(model_dir.glob("*.safetensors")))
    hidden = int(config.get("hidden_size") or config.get("n_embd") or config.get("d_model"))
    return ModelFacts(
        n_params=n_params,
        hidden_size=hidden,
        num_layers=int(config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers")),
        intermediate_size=int(config.get("intermediate_size") or config.get("n_inner") or 4 * hidden),
        vocab_size=int(config["vocab_size"]),
        max_position_embeddings=config.get("max_position_embeddings") or config.get("n_positions"),
    )


def _safetensors_params(path: Path) -> int:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
