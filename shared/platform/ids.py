"""Object ids in OpenAI's shape (`file-…`, `ftjob-…`). Safe as RQ job ids and storage key segments."""

import secrets


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def new_file_id() -> str:
    return new_id("file")


def new_job_id() -> str:
    return new_id("ftjob")
