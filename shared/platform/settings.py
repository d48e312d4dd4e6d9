"""All configuration, read once from `TUNERY_*` environment variables.

No other module reads the environment: services receive a `Settings` object.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.platform.cpus import usable_cpus


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNERY_", extra="ignore")

    # Where the embedded default keeps Redis data, local storage, model cache and metrics files.
    data_dir: Path = Path(".tunery")

    # Redis: queues and live state. None means "tunery up starts its own redis-server".
    redis_url: str | None = None

    # Object storage. With no bucket, files live under `storage_path` (default: <data_dir>/storage).
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    storage_path: Path | None = None

    # Base models. None means the built-in catalog (shared/planning/default_catalog.yaml).
    model_catalog: Path | None = None
    model_cache_dir: Path | None = None
    allow_trust_remote_code: bool = False

    # GPU classes (memory, speed, price): a YAML file; None means the single class `cpu`.
    gpu_classes: Path | None = None
    # Which train queue a trainer worker serves (`train:<gpu_class>`); also the default class of a job.
    gpu_class: str = "cpu"
    # How long the API waits for a worker to compute an estimate.
    estimate_timeout_seconds: float = 120.0
    # Threads for CPU training; 0 means one per CPU this process may use (affinity and cgroup quota).
    torch_threads: int = 0

    # For the CLI's `status` and `logs`: the key to use (else <data_dir>/api-key from `tunery up`).
    api_key: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Workers serve /metrics on these ports (0.0.0.0 in containers).
    metrics_host: str = "127.0.0.1"
    trainer_metrics_port: int = 9101
    evaluator_metrics_port: int = 9102
    inference_metrics_port: int = 9103

    # Smoke-test inference (POST /v1/chat/completions, /v1/classifications), served by `tunery inference`.
    # How long the API waits for an inference worker's answer; the first request for a model includes
    # loading it (and downloading a catalog model that is not cached yet).
    inference_timeout_seconds: float = Field(default=120.0, gt=0)
    # Models an inference worker keeps loaded between requests (least recently used go first).
    inference_cache_size: int = Field(default=2, ge=1)
    # The most tokens one chat completion may generate (also its default when max_tokens is not sent).
    inference_max_tokens: int = Field(default=512, ge=1)
    # The most texts one classification request may hold.
    inference_max_inputs: int = Field(default=64, ge=1)

    # Access. Keys are stored as HMAC-SHA256 with this secret when set (else SHA-256).
    api_key_secret: str | None = None
    # Registered at API start as an admin key of the default tenant (first use, tests).
    bootstrap_api_key: str | None = None

    # Request limits.
    max_upload_bytes: int = 1024**3
    max_line_bytes: int = 1024 * 1024
    max_json_bytes: int = 1024 * 1024
    max_upload_part_bytes: int = 64 * 1024 * 1024
    # Uploads up to this size are validated before the answer (status `processed` or `error`); larger ones
    # are answered once stored (status `uploaded`) and validated after it: poll GET /v1/files/{id}.
    sync_validation_bytes: int = Field(default=8 * 1024 * 1024, ge=0)
    rate_limit_per_minute: int = 600
    max_active_jobs_per_tenant: int = 10

    # RQ job timeouts. RQ's own default (180 s) would kill every real training run.
    train_timeout_seconds: int = 48 * 3600
    eval_timeout_seconds: int = 6 * 3600
    # Prompts a chat job's evaluation generates replies to, with the base and the fine-tuned model;
    # None: the evaluator's default for its device class (services.evaluator.task.GENERATION_ROWS).
    eval_generation_rows: int | None = Field(default=None, ge=0, le=512)
    # Workers heartbeat their running task this often; the janitor (in the API) treats a task silent
    # for worker_lost_after_seconds as lost and hands its job to another worker.
    worker_heartbeat_seconds: int = Field(default=10, ge=1)
    worker_lost_after_seconds: float = Field(default=120.0, gt=0)
    janitor_interval_seconds: float = Field(default=30.0, gt=0)
    # Attempts a job gets when its own training process dies (killed by the OOM killer, a crash in native
    # code). Faults of the platform (a worker or node lost, a Redis restart, a stop) do not count against
    # them; they get max_infrastructure_retries, so that a job that keeps taking its node down still ends.
    max_attempts: int = Field(default=3, ge=1)
    max_infrastructure_retries: int = Field(default=20, ge=0)
    # Workers and their tasks retry Redis commands for this long while Redis is unreachable (a restart),
    # then give up; the API waits api_redis_retry_seconds before it answers 503.
    redis_outage_seconds: float = Field(default=120.0, ge=0)
    api_redis_retry_seconds: float = Field(default=2.0, ge=0)
    # Publishing to a Hugging Face Hub (jobs with `hub_repo`): a write token, and another endpoint than
    # huggingface.co if wanted (a mirror, a private hub).
    hf_token: str | None = None
    hf_endpoint: str | None = None
    # A trainer group trains jobs on several nodes: `trainer_nodes` pods of one GPU class (a StatefulSet),
    # each with its rank (the pod's ordinal) and the rank-0 pod's address (its stable DNS name). Rank 0
    # takes jobs from train:<class>:nodes-<n> and starts them; the other ranks follow it.
    trainer_nodes: int = Field(default=1, ge=1)
    trainer_node_rank: int = Field(default=0, ge=0)
    trainer_main_address: str | None = None
    trainer_rendezvous_port: int = 29500
    # Full-state checkpoints (adapter, optimizer, scheduler, RNG, data position) while training, so a
    # preempted or killed attempt carries on from the last one; a job may set its own interval. 0: off.
    checkpoint_every_steps: int = Field(default=0, ge=0)
    checkpoint_every_seconds: float = Field(default=900.0, ge=0)
    # Periodic checkpoints kept per job (older ones are deleted; the final adapter is always kept).
    checkpoint_keep: int = Field(default=2, ge=1)
    # After SIGTERM a trainer finishes its step, saves a checkpoint and exits; a work horse still busy
    # after this many seconds is killed (its job resumes from its previous checkpoint). Keep Kubernetes'
    # terminationGracePeriodSeconds above it.
    stop_grace_seconds: float = Field(default=300.0, gt=0)
    # Progress events: one at least every this many seconds while training (and at each epoch end).
    progress_interval_seconds: float = 10.0
    # Examples kept per job's event stream (older ones are trimmed).
    max_events_per_job: int = Field(default=10_000, ge=100)

    # prometheus-client multiprocess files (one folder per service); default <data_dir>/metrics.
    metrics_dir: Path | None = None

    log_level: str = "INFO"

    @property
    def effective_redis_url(self) -> str:
        """The configured Redis; a service run alone without one uses a local default."""
        return self.redis_url or "redis://127.0.0.1:6379/0"

    @property
    def resolved_storage_path(self) -> Path:
        return self.storage_path or self.data_dir / "storage"

    @property
    def resolved_model_cache_dir(self) -> Path:
        return self.model_cache_dir or self.data_dir / "models"

    @property
    def resolved_metrics_dir(self) -> Path:
        return self.metrics_dir or self.data_dir / "metrics"

    @property
    def resolved_torch_threads(self) -> int:
        return self.torch_threads or usable_cpus()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def metrics_directory(settings: Settings, service: str) -> Path:
    """The prometheus multiprocess folder of a service: every process of it writes there."""
    return settings.resolved_metrics_dir.resolve() / service
