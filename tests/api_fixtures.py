"""Helpers for API tests: an app on the real test Redis, chat files to upload."""

from __future__ import annotations

import json
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
