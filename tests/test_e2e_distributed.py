"""End to end on real processes: a job on two devices (two gloo processes on this CPU) and a job on two
nodes (a trainer group of two trainer processes) train the same losses as the same job on one device."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.api_fixtures import IDENTITY_CHAT
from tests.conftest import CATALOG
from tests.helpers import free_port, stop_process
from tests.live import REPO, LiveTunery, live_env

pytestmark = pytest.mark.slow

GPU_CLASSES = """
gpu_classes:
  cpu: {memory_gb: 16, price_per_hour_usd: 0.1, peak_tflops: 0.1, assumed_mfu: 0.2, devices_per_node: 2}
"""
HYPERPARAMETERS = {"n_epochs": 1, "batch_size": 2, "packing": False}
TRAINING_ROWS = b"".join(IDENTITY_CHAT.read_bytes().splitlines(keepends=True)[:40])  # 36 train: 18 steps


@pytest.fixture
def live2(tmp_path, redis_url, s3_server, bucket_storage):
    """A live Tunery whose CPU class has two devices per node."""
    (tmp_path / "catalog.yaml").write_text(CATALOG.format(missing=tmp_path / "no-such-model"))
    (tmp_path / "gpu-classes.yaml").write_text(GPU_CLASSES)
    env = live_env(
        tmp_path, redis_url,
        {
            "TUNERY_MODEL_CATALOG": str(tmp_path / "catalog.yaml"),
            "TUNERY_GPU_CLASSES": str(tmp_path / "gpu-classes.yaml"),
            "TUNERY_S3_BUCKET": bucket_storage.bucket,
            "TUNERY_S3_ENDPOINT_URL": s3_server.endpoint_url,
            "TUNERY_S3_ACCESS_KEY_ID": s3_server.access_key_id,
            "TUNERY_S3_SECRET_ACCESS_KEY": s3_server.secret_access_key,
        },
    )  # fmt: skip
    (tmp_path / "logs").mkdir()
    tunery = LiveTunery(
        env=env, base_url=f"http://127.0.0.1:{env['TUNERY_API_PORT']}", logs=tmp_path / "logs"
    )
    try:
        tunery.start_all("api", "trainer", "evaluator")
        yield tunery
    finally:
        tunery.stop()


def _train(live: LiveTunery, file_id: str, **extra: object) -> tuple[dict, dict[int, float]]:
    body = {
        "model": "tunery/tiny-chat", "training_file": file_id, "seed": 7, "lora": {"dropout": 0.0},
        "method": {"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}}, **extra,
    }  # fmt: skip
    with live.client() as client:
        created = client.post("/v1/fine_tuning/jobs", json=body)
        assert created.status_code == 200, created.text
        job = created.json()
    final, _ = live.wait_for_job(job["id"], {"succeeded", "failed", "cancelled"}, timeout=600)
    assert final["status"] == "succeeded", (final["error"], live.log_tail("trainer"))
    with live.client() as client:
        rows = client.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics").json()["data"]
    return final, {r["step"]: r["train_loss"] for r in rows if r["kind"] == "train"}


def _upload(live: LiveTunery) -> str:
    with live.client() as client:
        return client.post(
            "/v1/files",
            files={"file": ("train.jsonl", TRAINING_ROWS)},
            data={"purpose": "fine-tune"},
        ).json()["id"]


def test_a_job_on_two_devices_trains_the_losses_of_one_device_and_pays_for_both(live2: LiveTunery):
    file_id = _upload(live2)
    single, single_losses = _train(live2, file_id)
    double, double_losses = _train(live2, file_id, num_gpus=2)
    assert double["resolved_hyperparameters"]["processes"] == 2
    assert double["resolved_hyperparameters"]["micro_batch_size"] == 1
    assert double["progress"]["total_steps"] == single["progress"]["total_steps"]
    assert double_losses == pytest.approx(single_losses, rel=1e-4)
    assert double["estimate"]["gpu_classes"]["cpu"]["devices"] == 2
    assert double["usage"]["device_seconds"] > 0 and double["usage"]["cost_usd"] > 0


def test_a_job_on_two_nodes_is_trained_by_a_trainer_group(live2: LiveTunery, tmp_path):
    file_id = _upload(live2)
    _, single_losses = _train(live2, file_id)
    group = {
        "TUNERY_TRAINER_NODES": "2", "TUNERY_TRAINER_MAIN_ADDRESS": "127.0.0.1",
        "TUNERY_TRAINER_RENDEZVOUS_PORT": str(free_port()), "TUNERY_TORCH_THREADS": "1",
    }  # fmt: skip
    ranks = []
    for rank in (0, 1):
        env = (
            live2.env
            | group
            | {"TUNERY_TRAINER_NODE_RANK": str(rank), "TUNERY_TRAINER_METRICS_PORT": str(free_port())}
        )
        log = open(tmp_path / f"rank{rank}.log", "wb")  # noqa: SIM115 - the child owns it
        ranks.append(
            subprocess.Popen(
                [sys.executable, "-m", "cli", "trainer"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        final, losses = _train(live2, file_id, num_nodes=2)
    finally:
        for process in ranks:
            stop_process(process, timeout=30)
    assert final["num_nodes"] == 2 and final["resolved_hyperparameters"]["processes"] == 2
    assert losses == pytest.approx(single_losses, rel=1e-4)
