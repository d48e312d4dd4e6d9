"""One torch thread for a small model on CPU.

A small model's ops are too little work to split: each op ends at a barrier of all the threads, and on a
busy machine that barrier waits for a descheduled thread. Measured on the 2-core machine under load: the
quickstart's 9 replies took 66 s with 2 threads, 1.8 s with one; its training (tiny-chat, 107k
parameters, 246 steps) 66 s against 3 s. Larger models and GPUs keep the process's setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Generation and scoring: a decode step is one token per op, so models up to this size stay on one thread.
SMALL_MODEL_PARAMETERS = 20_000_000
# Training: every op covers a whole micro-batch of tokens, which threads split well from much smaller
# models on (a 4 × 256 Llama, 20M parameters with its 30k vocabulary, trains 1.6x faster on 2 threads
# than on one); below this, the built-in tiny models (0.1M) and models of their kind.
SMALL_TRAINING_PARAMETERS = 2_000_000


def runs_on_one_thread(model: torch.nn.Module, limit: int = SMALL_MODEL_PARAMETERS) -> bool:
    """Whether `small_model_threads` gives `model` one thread: on CPU, with fewer than `limit` parameters."""
    device = next(model.parameters()).device
    return device.type == "cpu" and sum(parameter.numel() for parameter in model.parameters()) < limit


@contextlib.contextmanager
def small_model_threads(model: torch.nn.Module, limit: int = SMALL_MODEL_PARAMETERS) -> Iterator[None]:
    """One torch thread inside the block for a model on CPU with fewer than `limit` parameters; the
    setting is restored after."""
    if not runs_on_one_thread(model, limit):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
