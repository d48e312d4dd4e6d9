"""Shared fixtures: a real redis-server and a real S3-compatible server (moto in server mode).

Both run as subprocesses on free ports for the whole session; per-test fixtures give each
test a clean Redis database and its own bucket.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from shared.platform.storage import LocalStorage, S3Storage, Storage
from tests.api_fixtures import ADMIN_KEY
from tests.helpers import RedisServer, S3Server, free_port, stop_process, wait_for
from tests.live import LiveTunery, live_env


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--screenshots",
        metavar="DIR",
        default=None,
        help="save a screenshot of every console page the browser tests visit into DIR (default: none)",
    )


def _wait_or_fail(predicate: Callable[[], object], what: str, process: subprocess.Popen, log: Path) -> None:
    """Wait for a server; on failure show its log, which says why far better than a timeout."""
    try:
        wait_for(predicate, timeout=30, what=what, process=process)
    except (RuntimeError, TimeoutError) as exc:
        stop_process(process)
        output = log.read_text(errors="replace")[-4000:]
        pytest.fail(f"{exc}\n--- {log} ---\n{output}", pytrace=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail(
            "redis-server is not on PATH; install it with `apt-get install -y redis-server`", pytrace=False
        )
    port = free_port()
    data_dir = tmp_path_factory.mktemp("redis")
    log = open(data_dir / "redis.log", "wb")  # noqa: SIM115 - kept open for the server's lifetime
    options = {
        "port": str(port),
        "bind": "127.0.0.1",
        "save": "",
        "appendonly": "yes",
        "dir": str(data_dir),
        "daemonize": "no",
    }
    command = [executable]
    for name, value in options.items():
        command += [f"--{name}", value]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        _wait_or_fail(client.ping, f"redis-server on port {port}", process, data_dir / "redis.log")
        client.close()
        yield RedisServer(url=f"redis://127.0.0.1:{port}/0", port=port, dir=data_dir)
    finally:
        stop_process(process)
        log.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session's Redis, emptied first so tests cannot see each other's keys."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


def _http_answers(url: str) -> bool:
    # No proxy: an http_proxy variable in CI must not intercept a request to 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # Any HTTP status means the server is up.


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    log = open(log_path, "wb")  # noqa: SIM115 - kept open for the server's lifetime
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint_url = f"http://127.0.0.1:{port}"
    try:
        _wait_or_fail(lambda: _http_answers(endpoint_url), "moto server", process, log_path)
        yield S3Server(endpoint_url=endpoint_url, port=port)
    finally:
        stop_process(process)
        log.close()


@pytest.fixture
def s3_storage(s3_server: S3Server) -> S3Storage:
    """An S3Storage on a bucket of its own, with a key prefix so prefix handling is exercised."""
    storage = S3Storage(
        bucket=f"test-{uuid.uuid4().hex[:16]}",
        prefix="tunery/",
        endpoint_url=s3_server.endpoint_url,
        access_key_id=s3_server.access_key_id,
        secret_access_key=s3_server.secret_access_key,
    )
    storage.ensure_bucket()
    return storage


@pytest.fixture
def local_storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest) -> Storage:
    """Runs a test once per backend, so both keep the same behaviour."""
    return request.getfixturevalue(f"{request.param}_storage")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the session: the built-in tiny models are built once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def api_settings(redis_url: str, tmp_path: Path, model_cache: Path):
    from shared.platform.settings import Settings

    return Settings(
        redis_url=redis_url,
        data_dir=tmp_path / "data",
        model_cache_dir=model_cache,
        progress_interval_seconds=0.0,
        bootstrap_api_key=ADMIN_KEY,
    )


@pytest.fixture
def api(api_settings):
    """The API app in-process (TestClient) on the real test Redis and a local storage folder."""
    from fastapi.testclient import TestClient

    from services.api.app import create_app

    with TestClient(create_app(api_settings), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        yield client


def new_bucket(s3_server: S3Server) -> S3Storage:
    """A bucket of its own on the S3 server."""
    storage = S3Storage(
        bucket=f"e2e-{uuid.uuid4().hex[:12]}",
        endpoint_url=s3_server.endpoint_url,
        access_key_id=s3_server.access_key_id,
        secret_access_key=s3_server.secret_access_key,
    )
    storage.ensure_bucket()
    return storage


@pytest.fixture
def bucket_storage(s3_server) -> S3Storage:
    return new_bucket(s3_server)


CATALOG = """
models:
  tunery/tiny-chat:
    source: builtin:tiny-chat-llama
    license: apache-2.0
    max_seq_length: 512
    learning_rate: 1.0e-2
  tunery/tiny-chat-qwen2:
    source: builtin:tiny-chat-qwen2
    max_seq_length: 512
    learning_rate: 1.0e-2
  missing-weights:
    source: {missing}
"""


def start_live(
    folder: Path,
    redis_url: str,
    s3_server: S3Server,
    bucket: S3Storage,
    extra: dict[str, str] | None,
    started: list[LiveTunery],
) -> LiveTunery:
    """Start a live Tunery (API, trainer, evaluator) with the test catalog, its files under `folder`; it is
    appended to `started` first, so that it is stopped even when a service fails to start."""
    catalog = folder / "catalog.yaml"
    catalog.write_text(CATALOG.format(missing=folder / "no-such-model"))
    env = live_env(
        folder,
        redis_url,
        {
            "TUNERY_MODEL_CATALOG": str(catalog),
            "TUNERY_S3_BUCKET": bucket.bucket,
            "TUNERY_S3_ENDPOINT_URL": s3_server.endpoint_url,
            "TUNERY_S3_ACCESS_KEY_ID": s3_server.access_key_id,
            "TUNERY_S3_SECRET_ACCESS_KEY": s3_server.secret_access_key,
            **(extra or {}),
        },
    )
    logs = folder / "logs"
    logs.mkdir(exist_ok=True)
    tunery = LiveTunery(env=env, base_url=f"http://127.0.0.1:{env['TUNERY_API_PORT']}", logs=logs)
    started.append(tunery)
    tunery.start_all("api", "trainer", "evaluator")
    return tunery


@pytest.fixture
def live_factory(tmp_path: Path, s3_server, bucket_storage: S3Storage):
    """Starts a live Tunery (API, trainer, evaluator) on a Redis of the test's choice and the S3 server, with
    extra settings; every one started is stopped after the test."""
    started: list[LiveTunery] = []

    def start(redis_url: str, extra: dict[str, str] | None = None) -> LiveTunery:
        return start_live(tmp_path, redis_url, s3_server, bucket_storage, extra, started)

    try:
        yield start
    finally:
        for tunery in started:
            tunery.stop()


@pytest.fixture
def live(live_factory, redis_url: str) -> LiveTunery:
    return live_factory(redis_url)
