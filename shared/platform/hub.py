"""Publishing a fine-tuned model to a Hugging Face Hub repository (optional: it needs a token and a network).

After a job succeeds, its artifacts (the adapter or weights, the tokenizer, the merged model when exported,
the model card as the repository's README, the evaluation report) are uploaded to the job's `hub_repo`, a
private repository created if missing. A push that fails (no network, a refused token) leaves the job
succeeded and says why in an event: the artifacts stay in Tunery's storage either way.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from shared.platform import storage_keys
from shared.platform.records import JobRecord
from shared.platform.settings import Settings
from shared.platform.storage import Storage

log = logging.getLogger(__name__)

# Not published: replies generated on the user's validation rows may hold their data.
PRIVATE_ARTIFACTS = ("generations.jsonl",)


def push_to_hub(settings: Settings, storage: Storage, record: JobRecord) -> str:
    """Upload the job's artifacts to `record.hub_repo`; the repository's URL. Raises on any failure."""
    if not record.hub_repo or not settings.hf_token:
        raise ValueError("a Hub push needs the job's hub_repo and the server's TUNERY_HF_TOKEN")
    api = HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token)
    with tempfile.TemporaryDirectory(prefix=f"tunery-hub-{record.id}-") as tmp:
        folder = Path(tmp)
        storage.download_prefix(storage_keys.artifacts_prefix(record.tenant, record.id), folder)
        for name in PRIVATE_ARTIFACTS:
            (folder / name).unlink(missing_ok=True)
        repo = api.create_repo(record.hub_repo, private=True, exist_ok=True)
        api.upload_folder(
            repo_id=record.hub_repo, folder_path=folder,
            commit_message=f"Tunery job {record.id}: {record.fine_tuned_model}",
        )  # fmt: skip
    return str(repo)
