"""Prometheus metrics of every Tunery process, with bounded label sets (never a job id).

Processes run prometheus-client in multiprocess mode (the CLI points PROMETHEUS_MULTIPROC_DIR at
a fresh directory before this module is imported), because RQ forks a work horse per task and
the API may run several uvicorn workers: all of them must add up in one scrape.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Worker

from shared.job_states import JobState
from shared.job_store import STATE_COUNTS_KEY
from shared.queue import queue

HTTP_REQUEST_SECONDS = Histogram(
    "tunery_http_request_duration_seconds",
    "API request latency.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TRAINED_TOKENS = Counter(
    "tunery_trained_tokens_total", "Non-padding tokens processed by training steps.", ["gpu_class"]
)
TRAINING_STEP_SECONDS = Histogram(
    "tunery_training_step_duration_seconds",
    "Wall time of one optimizer step.",
    ["gpu_class"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
TRAINING_TOKENS_PER_SECOND = Gauge(
    "tunery_training_tokens_per_second",
    "Throughput of the latest optimizer step on this worker.",
    ["gpu_class"],
    multiprocess_mode="mostrecent",
)
DEVICE_SECONDS = Counter(
    "tunery_device_seconds_total", "Device-seconds held by training, every device counted.", ["gpu_class"]
)
COST_USD = Counter(
    "tunery_cost_usd_total",
    "Cost of training in USD (device-seconds × the class's price).",
    ["tenant", "gpu_class"],
)
TASKS_FINISHED = Counter(
    "tunery_worker_tasks_total", "Tasks a worker finished, by outcome.", ["service", "outcome"]
)


class RedisStateCollector(Collector):
    """Jobs by state, queue backlog and workers, read from Redis at scrape time (the API exports these).

    Read at scrape time rather than counted by a process, so every API replica reports the truth.
    """

    def __init__(self, redis: Redis):
        self.redis = redis

    def collect(self):  # type: ignore[override]
        jobs = GaugeMetricFamily("tunery_jobs", "Fine-tuning jobs by internal state.", labels=["state"])
        depth = GaugeMetricFamily("tunery_queue_depth", "Tasks waiting in each RQ queue.", labels=["queue"])
        oldest = GaugeMetricFamily(
            "tunery_queue_oldest_job_age_seconds",
            "Age of the task waiting longest in each queue.",
            labels=["queue"],
        )
        workers = GaugeMetricFamily(
            "tunery_workers", "RQ workers by service and state (busy or idle).", labels=["service", "state"]
        )
        try:
            counts = {k.decode(): int(v) for k, v in self.redis.hgetall(STATE_COUNTS_KEY).items()}
            for state in JobState:
                jobs.add_metric([state.value], counts.get(state.value, 0))
            now = datetime.now(UTC)
            for rq_queue in sorted(Queue.all(connection=self.redis), key=lambda q: q.name):
                named = queue(self.redis, rq_queue.name)
                depth.add_metric([rq_queue.name], named.count)
                head = named.get_job_ids(0, 1)
                task = named.fetch_job(head[0]) if head else None
                age = (
                    (now - task.enqueued_at.replace(tzinfo=UTC)).total_seconds()
                    if task and task.enqueued_at
                    else 0.0
                )
                oldest.add_metric([rq_queue.name], max(0.0, age))
            tally: dict[tuple[str, str], int] = {}
            for worker in Worker.all(connection=self.redis):
                service = worker.name.split("-", 1)[0]
                state = "busy" if worker.get_state() == "busy" else "idle"
                tally[service, state] = tally.get((service, state), 0) + 1
            for (service, state), n in sorted(tally.items()):
                workers.add_metric([service, state], n)
        except RedisError:
            return
        yield jobs
        yield depth
        yield oldest
        yield workers


def registry(multiprocess_dir: Path | None) -> CollectorRegistry:
    """The registry a process serves on /metrics: every process's values when in multiprocess mode."""
    if multiprocess_dir is None:
        return REGISTRY
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg, path=str(multiprocess_dir))
    return reg
