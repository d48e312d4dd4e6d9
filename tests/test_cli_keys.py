"""`tunery keys create|list|revoke` against the real test Redis."""

from __future__ import annotations

import os
import subprocess
import sys

import redis

from shared.platform.api_keys import KeyStore
from tests.live import REPO


def tunery(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")} | {
        "TUNERY_REDIS_URL": redis_url
    }
    return subprocess.run(
        [sys.executable, "-m", "cli", "keys", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_create_prints_a_key_that_authenticates_as_its_tenant_and_role(redis_url):
    created = tunery(redis_url, "create", "--tenant", "org-a", "--role", "admin", "--name", "ci")
    assert created.returncode == 0, created.stderr
    plain = created.stdout.strip()
    key = KeyStore(redis.Redis.from_url(redis_url)).authenticate(plain)
    assert (key.tenant, key.role, key.name) == ("org-a", "admin", "ci")


def test_list_shows_ids_but_never_keys(redis_url):
    plain = tunery(redis_url, "create", "--tenant", "org-a").stdout.strip()
    listed = tunery(redis_url, "list")
    assert listed.returncode == 0
    key_id = plain.split("_")[1]
    assert key_id in listed.stdout
    assert plain not in listed.stdout


def test_revoke_disables_a_key(redis_url):
    plain = tunery(redis_url, "create").stdout.strip()
    revoked = tunery(redis_url, "revoke", plain.split("_")[1])
    assert revoked.returncode == 0
    assert KeyStore(redis.Redis.from_url(redis_url)).authenticate(plain) is None


def test_an_unknown_role_is_refused(redis_url):
    refused = tunery(redis_url, "create", "--role", "owner")
    assert refused.returncode == 2
    assert "role must be one of member, admin" in refused.stderr
