"""Training on several processes: the accelerate configuration generated from a job, and two gloo
processes training the same tiny job as one process does, with the same losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from services.trainer.launch import accelerate_config, launch_env
from services.trainer.recipes.sft import train_sft
from shared.ml.builtin_models import build_tiny_chat_model
from shared.platform.records import Hyperparameters, JobRecord, LoraSettings
from tests.test_sft import RecordingHooks, make_config

REPO = Path(__file__).resolve().parents[1]


def job(**fields: object) -> JobRecord:
    hp = Hyperparameters(
        n_epochs=1, batch_size=8, micro_batch_size=2, gradient_accumulation_steps=2, processes=2,
        learning_rate_multiplier=1.0, learning_rate=1e-4, max_seq_length=128,
    )  # fmt: skip
    return JobRecord(
        id="ftjob-x", tenant="t", created_at=0, model="m", training_file="file-x", seed=0,
        lora=LoraSettings(), hyperparameters=hp, num_gpus=2, **fields,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("distributed", "expected_type"),
    [
        ("ddp", "MULTI_GPU"),
        ("fsdp", "FSDP"),
        ("deepspeed_zero2", "DEEPSPEED"),
        ("deepspeed_zero3", "DEEPSPEED"),
    ],
)
def test_each_distributed_option_renders_a_configuration_accelerate_loads(
    tmp_path: Path, distributed: str, expected_type: str
) -> None:
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump(accelerate_config(job(distributed=distributed), on_gpu=True)))
    loaded = load_config_from_file(str(path))
    assert loaded.distributed_type.value == expected_type
    assert (loaded.num_processes, loaded.num_machines, str(loaded.mixed_precision)) == (2, 1, "bf16")
    if distributed == "fsdp":
        assert loaded.fsdp_config["fsdp_version"] == 2
    if distributed.startswith("deepspeed"):
        assert loaded.deepspeed_config["zero_stage"] == int(distributed[-1])
        assert loaded.deepspeed_config["gradient_accumulation_steps"] == 2


def test_a_job_on_several_nodes_names_the_main_node(tmp_path: Path) -> None:
    record = job(num_nodes=2)
    with pytest.raises(ValueError, match="main node"):
        accelerate_config(record, on_gpu=True)
    config = accelerate_config(record, on_gpu=True, machine_rank=1, main_process_ip="trainer-0.trainer")
    assert (config["num_processes"], config["machine_rank"], config["main_process_ip"]) == (
        4,
        1,
        "trainer-0.trainer",
    )


def test_cpu_processes_join_over_gloo_with_a_share_of_the_cores_each() -> None:
    env = launch_env(job(), on_gpu=False, cpu_threads=8)
    assert env["ACCELERATE_USE_CPU"] == "true" and env["OMP_NUM_THREADS"] == "4"


def test_two_gloo_processes_train_the_same_losses_as_one_for_the_same_global_batch(tmp_path: Path) -> None:
    model_dir = build_tiny_chat_model(tmp_path / "model", arch="llama")
    one = RecordingHooks()
    single = train_sft(make_config(model_dir, tmp_path / "one", n_epochs=2, batch_size=4), one)

    config = tmp_path / "accelerate.yaml"
    config.write_text(yaml.safe_dump(accelerate_config(job(), on_gpu=False, main_process_port=_free_port())))
    losses = tmp_path / "losses.json"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        str(REPO / "tests" / "distributed_sft.py"), str(model_dir), str(tmp_path / "two"), str(losses), "2",
    ]  # fmt: skip
    env = launch_env(job(), on_gpu=False, cpu_threads=os.cpu_count() or 2) | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(losses.read_text())
    assert two["total_steps"] == single.total_steps == 10
    expected = {m.step: m.train_loss for m in one.steps}
    assert {int(step): loss for step, loss in two["losses"].items()} == pytest.approx(expected, rel=1e-4)


def test_two_gloo_processes_stop_together_and_resume_with_the_losses_of_one_uninterrupted_process(
    tmp_path: Path,
) -> None:
    model_dir = build_tiny_chat_model(tmp_path / "model", arch="llama")
    one = RecordingHooks()
    train_sft(make_config(model_dir, tmp_path / "one", n_epochs=2, batch_size=4), one)

    def launch(name: str, stop: str, resume_from: str) -> dict:
        config = tmp_path / f"{name}.yaml"
        config.write_text(
            yaml.safe_dump(accelerate_config(job(), on_gpu=False, main_process_port=_free_port()))
        )
        losses = tmp_path / f"{name}.json"
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            str(REPO / "tests" / "distributed_sft.py"), str(model_dir), str(tmp_path / name), str(losses), "2",
            str(tmp_path / "checkpoints"), stop, resume_from,
        ]  # fmt: skip
        env = launch_env(job(), on_gpu=False, cpu_threads=os.cpu_count() or 2) | {"PYTHONPATH": str(REPO)}
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(losses.read_text())

    cancelled = launch("cancelled", "3:discard", "-")
    assert cancelled["stopped"] == "discard" and sorted(cancelled["losses"], key=int)[-1] == "3"
    assert not (tmp_path / "cancelled" / "adapter").exists() and not (tmp_path / "checkpoints").exists()
    first = launch("first", "4:suspend", "-")
    assert first["stopped"] == "suspend" and sorted(first["losses"], key=int)[-1] == "4"
    saved = tmp_path / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in saved.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    second = launch("second", "0", str(saved))
    expected = {m.step: m.train_loss for m in one.steps}
    resumed = {int(step): loss for step, loss in second["losses"].items()}
    assert sorted(resumed) == list(range(5, 11))
    assert resumed == pytest.approx({s: expected[s] for s in resumed}, rel=1e-4)


def _free_port() -> int:
    from tests.helpers import free_port

    return free_port()
