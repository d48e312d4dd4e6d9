"""Prometheus metrics of every Tunery process, with bounded label sets (never a job id).

Processes run prometheus-client in multiprocess mode (the CLI points PROMETHEUS_MULTIPROC_DIR at
a fresh directory before this module is imported), because RQ forks a work horse per task and
the API may run several uvicorn workers: all of them must add up in one scrape.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

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
    """Jobs by status and queue depth, read from Redis at scrape time (the API exports these)."""

    def __init__(self, redis: Redis, queue_names: Iterable[str] | None = None):
        self.redis = redis
        self.queue_names = queue_names

    def collect(self):  # type: ignore[override]
        jobs = GaugeMetricFamily("tunery_jobs", "Fine-tuning jobs by internal state.", labels=["state"])
        depth = GaugeMetricFamily("tunery_queue_depth", "Tasks waiting in each RQ queue.", labels=["queue"])
        try:
            counts = {k.decode(): int(v) for k, v in self.redis.hgetall(STATE_COUNTS_KEY).items()}
            for state in JobState:
                jobs.add_metric([state.value], counts.get(state.value, 0))
            names = self.queue_names or [q.name for q in Queue.all(connection=self.redis)]
            for name in sorted(names):
                depth.add_metric([name], queue(self.redis, name).count)
        except RedisError:
            return
        yield jobs
        yield depth


def registry(multiprocess_dir: Path | None) -> CollectorRegistry:
    """The registry a process serves on /metrics: every process's values when in multiprocess mode."""
    if multiprocess_dir is None:
        return REGISTRY
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg, path=str(multiprocess_dir))
    return reg
