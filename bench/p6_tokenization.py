"""P6: Tunery's chat tokenization of the alpaca demo rows against the raw batched fast tokenizer.

Tunery's side is `shared.ml.chat_data.tokenize_all`, what data preparation and training run: the chat
template rendered per turn to locate the trained reply tokens (loss masking). The peer renders each whole
conversation once with the same template and encodes all texts in one batched call of the Rust
`tokenizers` backend (no masks): the floor any chat tokenization pays.

    .venv/bin/python bench/p6_tokenization.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common  # noqa: F401 - puts the repository on sys.path
from common import alpaca_conversations, build_llama, emit
from transformers import AutoTokenizer

from shared.ml.chat_data import tokenize_all

PASSES = 5  # over all rows per timed repeat: one pass takes a fifth of a second, too short to time alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_llama(Path(tmp) / "model", layers=1, hidden=64, intermediate=128, heads=4)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = alpaca_conversations()
    texts = [tokenizer.apply_chat_template(r, tokenize=False) for r in rows]
    backend = tokenizer.backend_tokenizer  # the raw tokenizers.Tokenizer
    n_tokens = sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))

    def tunery() -> float:
        tokenize_all(tokenizer, rows, 4096, eos_token_ids={tokenizer.eos_token_id})
        return len(rows)

    def peer() -> float:
        backend.encode_batch(
            [tokenizer.apply_chat_template(r, tokenize=False) for r in rows], add_special_tokens=False
        )
        return len(rows)

    tunery(), peer()  # warm: the template compiled, the tokenizer's caches and threads started
    results: dict[str, list[float]] = {"tunery": [], "peer": []}
    for repeat in range(args.repeats):
        for side, run in (("tunery", tunery), ("peer", peer))[:: 1 if repeat % 2 == 0 else -1]:
            started = time.perf_counter()
            n = sum(run() for _ in range(PASSES))
            results[side].append(n / (time.perf_counter() - started))
            print(f"P6 repeat {repeat + 1} {side}: {results[side][-1]:.0f} rows/s", flush=True)
    emit(
        [
            {
                "id": "P6", "benchmark": "chat tokenization (alpaca demo)", "unit": "rows/s",
                "tunery": results["tunery"], "peer": results["peer"],
                "peer_name": "chat template rendered once per row + tokenizers.Tokenizer.encode_batch",
                "setup": f"{len(rows)} rows, {n_tokens} tokens, MiniLM WordPiece (30,524) with ChatML markers",
            }
        ]
    )  # fmt: skip


if __name__ == "__main__":
    main()
