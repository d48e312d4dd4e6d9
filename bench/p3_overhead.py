"""P3: job overhead with warm workers, the README quickstart's job against the same work in one script.

Tunery's side: a real stack (redis-server of our own, `tunery api`, `tunery trainer`, `tunery evaluator`
as processes, local storage in a temporary folder), workers ready before timing; the quickstart file
(examples/data/identity_chat.jsonl) is uploaded once; each repeat POSTs the quickstart's job (tunery/tiny-chat,
every hyperparameter "auto") and times POST → first training step (the first point in
GET /v1/fine_tuning/jobs/{id}/metrics, polled every 50 ms: events carry whole seconds only), the job's
`evaluating` and `succeeded` states (GET polled every 50 ms). Training is first step → `evaluating`,
evaluation `evaluating` → `succeeded`. The first job computes the base model's side of the evaluation;
later jobs read it from the base-results cache, so P3-eval is the first job's evaluation ÷ training and
P3-eval-cached the later jobs' (with --repeats 1, one more job is run for it).

The peer does the same work in this warm process with Tunery's own functions and no services: the same
held-out split, `train_sft` with the job's resolved hyperparameters and LoRA settings, then the base and the
tuned model scored on the held-out rows (`evaluate_causal_lm`) and both answering the held-out prompts
greedily (`generate_replies`: as many prompts and new tokens as the evaluator's defaults on this machine
allow), as the evaluator does, with no cache.

    .venv/bin/python bench/p3_overhead.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401 - puts the repository on sys.path
import httpx
import redis
import torch
from common import REPO, chat_examples, emit, service_env, start_process, start_redis
from peft import PeftModel
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from services.evaluator.task import GENERATION_BATCH_SIZE, generation_plan
from services.trainer.recipes.sft import SFTConfig, train_sft
from shared.data.splits import holdout_split
from shared.ml.builtin_models import build_tiny_chat_model
from shared.ml.chat_data import iter_batches, read_conversations, tokenize_dataset
from shared.ml.generation_metrics import generate_replies, generation_cases
from shared.ml.lm_metrics import evaluate_causal_lm
from shared.ml.model_loading import generation_eos_ids, load_causal_lm
from shared.ml.threads import small_model_threads
from shared.platform.settings import Settings
from tests.helpers import free_port, port_open, stop_process

KEY = "sk-bench-overhead"
QUICKSTART = REPO / "examples/data/identity_chat.jsonl"
POLL = 0.05


class _NoHooks:
    def on_step(self, m: object) -> None:
        pass

    def on_epoch_end(self, epoch: int, valid_metrics: dict[str, float] | None) -> None:
        pass

    def should_stop(self) -> None:
        return None


@dataclass
class JobTimes:
    """Seconds from the POST: to the first training step, to `evaluating`, to `succeeded` (0 with --quick)."""

    job_id: str
    first_step: float
    evaluating: float = 0.0
    succeeded: float = 0.0

    @property
    def training(self) -> float:
        return self.evaluating - self.first_step

    @property
    def evaluation(self) -> float:
        return self.succeeded - self.evaluating


def run_job(http: httpx.Client, file_id: str, *, first_step_only: bool = False) -> JobTimes:
    """POST the quickstart job and time its phases. With `first_step_only` (--quick) the job is cancelled
    after its first step."""
    started = time.perf_counter()
    job = http.post("/v1/fine_tuning/jobs", json={"model": "tunery/tiny-chat", "training_file": file_id})
    job_id = job.raise_for_status().json()["id"]
    first_step = evaluating = None
    while True:
        if first_step is None and http.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json().get("data"):
            first_step = time.perf_counter() - started
            if first_step_only:
                http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").raise_for_status()
                return JobTimes(job_id, first_step)
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        status = job["status"]  # OpenAI's statuses: `stage` tells training from evaluation
        if job["stage"] == "evaluating" and evaluating is None:
            evaluating = time.perf_counter() - started
        if status == "succeeded":
            done = time.perf_counter() - started
            return JobTimes(job_id, first_step or done, evaluating or done, done)
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"job {job_id} {status}")
        time.sleep(POLL)


def bare(record: dict, model_dir: Path) -> float:
    """The job's training and evaluation in this process, no services; its wall seconds."""
    started = time.perf_counter()
    hp, lora = record["hyperparameters"], record["lora"]
    train_rows, held_out = holdout_split(
        read_conversations(QUICKSTART, QUICKSTART.name), record.get("seed") or 0
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            model_dir=model_dir, output_dir=Path(tmp), train_examples=chat_examples(train_rows), valid_examples=None,
            n_epochs=hp["n_epochs"], batch_size=hp["micro_batch_size"], learning_rate=hp["learning_rate"],
            lora_r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"], max_seq_length=hp["max_seq_length"], seed=record.get("seed") or 0,
            gradient_accumulation_steps=hp["gradient_accumulation_steps"], warmup_ratio=hp["warmup_ratio"],
            weight_decay=hp["weight_decay"], scheduler=hp["scheduler"], max_grad_norm=hp["max_grad_norm"],
        )  # fmt: skip
        train_sft(config, _NoHooks())
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        examples, _ = tokenize_dataset(tokenizer, held_out, hp["max_seq_length"], dataset="validation")
        base = load_causal_lm(model_dir, trust_remote_code=False, dtype=torch.float32)
        tuned = PeftModel.from_pretrained(load_causal_lm(model_dir, trust_remote_code=False, dtype=torch.float32),
                                          Path(tmp) / "adapter")  # fmt: skip
        cases = generation_cases(held_out, generation_plan(Settings()).rows)
        eos_ids = generation_eos_ids(model_dir, tokenizer, trust_remote_code=False)
        for model in (base, tuned):
            with small_model_threads(model):
                evaluate_causal_lm(model, iter_batches(examples, 8, tokenizer.pad_token_id))
                generate_replies(
                    model, tokenizer, cases, eos_token_ids=eos_ids, pad_token_id=tokenizer.pad_token_id,
                    max_prompt_tokens=hp["max_seq_length"], batch_size=GENERATION_BATCH_SIZE,
                )  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="first step only: one job, cancelled after it")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    if args.quick:
        args.repeats = 1
    processes = []
    results: dict[str, list[float]] = {"tunery": [], "first_step": [], "peer": [], "eval": [], "cached": []}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            redis_process, redis_url = start_redis(Path(tmp))
            processes.append(redis_process)
            ports = {name: str(free_port()) for name in ("API", "TRAINER_METRICS", "EVALUATOR_METRICS")}
            env = service_env(Path(tmp), redis_url, KEY, {f"TUNERY_{k}_PORT": v for k, v in ports.items()})
            api_url = f"http://127.0.0.1:{ports['API']}"
            processes.append(
                start_process([sys.executable, "-m", "cli", "api"], env, Path(tmp) / "api.log",
                              lambda: httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200, "tunery api")
            )  # fmt: skip
            for service in ("trainer", "evaluator"):
                port = int(ports[f"{service.upper()}_METRICS"])
                processes.append(
                    start_process([sys.executable, "-m", "cli", service], env, Path(tmp) / f"{service}.log",
                                  lambda port=port: port_open(port), f"tunery {service}")
                )  # fmt: skip
            http = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            file = http.post("/v1/files", files={"file": (QUICKSTART.name, QUICKSTART.read_bytes())},
                             data={"purpose": "fine-tune"}).raise_for_status().json()  # fmt: skip
            model_dir = build_tiny_chat_model(Path(tmp) / "tiny-chat")
            store = redis.Redis.from_url(redis_url)
            for repeat in range(args.repeats):
                # Repeat 1 starts with the job: the peer needs its resolved hyperparameters.
                for side in ("tunery", "peer")[:: 1 if repeat % 2 == 0 else -1][: 1 if args.quick else 2]:
                    if side == "tunery":
                        times = run_job(http, file["id"], first_step_only=args.quick)
                        results["first_step"].append(times.first_step)
                        results["tunery"].append(times.succeeded)
                        if not args.quick:
                            results["cached" if results["eval"] else "eval"].append(
                                times.evaluation / times.training
                            )
                        record = json.loads(store.get(f"tunery:job:{times.job_id}"))
                        done = (
                            ""
                            if args.quick
                            else (
                                f", succeeded {times.succeeded:.2f} s (training {times.training:.2f} s, "
                                f"evaluation {times.evaluation:.2f} s)"
                            )
                        )
                        print(
                            f"P3 repeat {repeat + 1} tunery: first step {times.first_step:.2f} s{done}",
                            flush=True,
                        )
                    else:
                        results["peer"].append(bare(record, model_dir))
                        print(f"P3 repeat {repeat + 1} bare script: {results['peer'][-1]:.2f} s", flush=True)
            if not args.quick and not results["cached"]:
                times = run_job(http, file["id"])
                results["cached"].append(times.evaluation / times.training)
                print(
                    f"P3 base results cached: training {times.training:.2f} s, evaluation {times.evaluation:.2f} s",
                    flush=True,
                )
            http.close()
        finally:
            for process in reversed(processes):
                stop_process(process, timeout=30)
    hp = record["hyperparameters"]
    setup = (
        f"quickstart job: tunery/tiny-chat, identity_chat.jsonl, resolved n_epochs {hp['n_epochs']}, batch "
        f"{hp['batch_size']}, max length {hp['max_seq_length']}; warm api, trainer and evaluator processes"
    )
    rows = [
        {
            "id": "P3", "benchmark": "quickstart job, POST → succeeded", "unit": "s", "lower_is_better": True,
            "tunery": results["tunery"], "peer": results["peer"],
            "peer_name": "the same split, train_sft and evaluation in one warm process, no services",
            "setup": setup,
        },
        {
            "id": "P3-first-step", "benchmark": "quickstart job, POST → first training step", "unit": "s",
            "lower_is_better": True, "tunery": results["first_step"], "peer": [],
            "peer_name": "(none)", "setup": "first point of /metrics, polled every 50 ms",
        },
        {
            "id": "P3-eval", "benchmark": "quickstart job, evaluation ÷ training (base side computed)",
            "unit": "x", "lower_is_better": True, "tunery": results["eval"], "peer": [], "peer_name": "(none)",
            "setup": "the first job: `evaluating` → `succeeded` over first step → `evaluating`; "
                     f"{generation_plan(Settings()).describe()} per model",
        },
        {
            "id": "P3-eval-cached", "benchmark": "quickstart job, evaluation ÷ training (base side cached)",
            "unit": "x", "lower_is_better": True, "tunery": results["cached"], "peer": [],
            "peer_name": "(none)", "setup": "later jobs on the same base model, data and settings",
        },
    ]  # fmt: skip
    emit(rows[1:2] if args.quick else rows)


if __name__ == "__main__":
    main()
