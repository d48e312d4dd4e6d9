"""Helpers for API tests: an app on the real test Redis, chat files to upload."""

from __future__ import annotations

import json
import time
from pathlib import Path

# Registered as the default tenant's admin key through TUNERY_BOOTSTRAP_API_KEY.
ADMIN_KEY = "tun_bootstrap_test-admin-key"

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
IDENTITY_CHAT = EXAMPLES / "identity_chat.jsonl"


def chat_lines(n: int) -> bytes:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def prepared(api, settings, job_id: str) -> dict:
    """Run the real `validating_files` task (an evaluator's) in this process, then read the job."""
    from services.evaluator.prepare import prepare_job

    prepare_job(job_id, settings)
    return api.get(f"/v1/fine_tuning/jobs/{job_id}").json()


def wait_validated(client, file: dict, timeout: float = 120) -> dict:
    """The file once validated: as answered, or (larger than TUNERY_SYNC_VALIDATION_BYTES, validated after
    the answer) once GET /v1/files/{id} says its status has left `uploaded`."""
    deadline = time.monotonic() + timeout
    while file["status"] == "uploaded":
        assert time.monotonic() < deadline, f"{file['id']} still uploaded after {timeout} s"
        time.sleep(0.05)
        file = client.get(f"/v1/files/{file['id']}").json()
    return file
