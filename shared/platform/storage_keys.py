"""Where each thing lives in object storage. Keys are built here from server-made ids only."""


def tenant_prefix(tenant: str) -> str:
    return f"tenants/{tenant}/"


def file_key(tenant: str, file_id: str) -> str:
    return f"tenants/{tenant}/files/{file_id}"


def job_prefix(tenant: str, job_id: str) -> str:
    return f"tenants/{tenant}/jobs/{job_id}/"


def job_manifest_key(tenant: str, job_id: str) -> str:
    return job_prefix(tenant, job_id) + "job.json"


def adapter_prefix(tenant: str, job_id: str) -> str:
    return job_prefix(tenant, job_id) + "artifacts/adapter/"


def tokenizer_prefix(tenant: str, job_id: str) -> str:
    return job_prefix(tenant, job_id) + "artifacts/tokenizer/"


def model_prefix(tenant: str, job_id: str) -> str:
    """Fully fine-tuned weights (a classifier trained with method full), loadable without the base model."""
    return job_prefix(tenant, job_id) + "artifacts/model/"


def labels_key(tenant: str, job_id: str) -> str:
    """A classifier's labels.json: class id i is labels[i]."""
    return job_prefix(tenant, job_id) + "artifacts/labels.json"


def artifacts_prefix(tenant: str, job_id: str) -> str:
    return job_prefix(tenant, job_id) + "artifacts/"


def merged_prefix(tenant: str, job_id: str) -> str:
    return job_prefix(tenant, job_id) + "artifacts/merged/"


def checkpoint_prefix(tenant: str, job_id: str, attempt: int, step: int) -> str:
    """A full-state checkpoint; the attempt in the name keeps a fenced-off attempt from overwriting."""
    return f"{job_prefix(tenant, job_id)}checkpoints/attempt-{attempt}-step-{step:08d}/"


def model_card_key(tenant: str, job_id: str) -> str:
    return job_prefix(tenant, job_id) + "artifacts/README.md"


def evaluation_report_key(tenant: str, job_id: str) -> str:
    return job_prefix(tenant, job_id) + "artifacts/evaluation.json"


def generations_key(tenant: str, job_id: str) -> str:
    """The evaluator's generated replies (base and fine-tuned) beside the references, one JSON line each."""
    return job_prefix(tenant, job_id) + "artifacts/generations.jsonl"


def evaluation_prefix(tenant: str, evaluation_id: str) -> str:
    """A standalone evaluation's report and generated replies."""
    return f"tenants/{tenant}/evaluations/{evaluation_id}/"


def validation_split_key(tenant: str, job_id: str) -> str:
    """Held-out rows the trainer set aside when the job had no validation file (JSONL in the job's task's
    format: chat messages, classification rows or preference pairs, each with its other fields)."""
    return job_prefix(tenant, job_id) + "data/validation_split.jsonl"


def base_evaluation_key(tenant: str, digest: str) -> str:
    """A base model's cached side of a chat evaluation (services.evaluator.base_cache), by the digest of
    what it was computed from; kept per tenant, since the replies quote the tenant's data."""
    return f"{tenant_prefix(tenant)}cache/base-evaluations/{digest}.json"
