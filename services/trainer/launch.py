"""Training on several devices: the recipe under `accelerate launch`, configured from the job.

A job with `num_gpus` × `num_nodes` > 1 runs its recipe in one process per device, started by
`accelerate launch` (torchrun underneath) with an accelerate configuration generated here from the job:
`ddp` (a replica per device), `fsdp` (FSDP2: weights, gradients and optimizer state sharded) or
`deepspeed_zero2`/`deepspeed_zero3`, bf16 on GPUs. The recipes need nothing else: accelerate hands each
process its device and its share of every batch, and the loss is normalised across processes.

The work horse (`run_launched`) writes the recipe's config and the accelerate configuration to its work
directory, starts the launcher and waits. Every launched process runs `main`: it connects to Redis and
storage itself and builds the same hooks and checkpoint sink as a single-process run, of which only the
main process reports progress and cost (cost counts every device) and decides when to stop. The main
process writes the recipe's result back for the work horse to publish.

SIGTERM to the work horse (preemption) is passed to the main training process alone; the stop it asks
for is agreed by every process, which then save a checkpoint together and exit, as one process would.

Several nodes: a trainer group of n pods (a StatefulSet: k8s/README.md) trains the jobs of n nodes. Rank 0
(pod ordinal 0) takes a job from `train:<class>:nodes-<n>`, stores the launch spec and announces the attempt
in Redis; every other rank (`follow_group`) fetches its own copy of the model and of the checkpoint to
resume from and starts its node's processes with its `machine_rank`. The rendezvous address is rank 0's
stable DNS name (TUNERY_TRAINER_MAIN_ADDRESS), the rank the pod's ordinal (TUNERY_TRAINER_NODE_RANK). A
process that dies on any node ends every process; the job then goes back to its queue and carries on from
its last checkpoint, as after a killed worker.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from shared.platform import storage_keys
from shared.platform.failures import JobFailure
from shared.platform.job_store import StaleAttempt
from shared.platform.queue import TRAIN_TASK
from shared.platform.records import JobError, JobRecord
from shared.platform.recovery import recover_killed_task
from shared.platform.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500
# A follower marks itself present this long (renewed every poll); rank 0 waits this long for them all.
PRESENCE_TTL_SECONDS = 30
FOLLOWERS_TIMEOUT_SECONDS = 120.0


def world_size(record: JobRecord) -> int:
    return record.num_gpus * record.num_nodes


def accelerate_config(
    record: JobRecord,
    *,
    on_gpu: bool,
    machine_rank: int = 0,
    main_process_ip: str | None = None,
    main_process_port: int = DEFAULT_PORT,
) -> dict[str, Any]:
    """The `accelerate launch --config_file` content for this job (see accelerate's ClusterConfig)."""
    hp = record.hyperparameters
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "num_processes": world_size(record),
        "num_machines": record.num_nodes,
        "machine_rank": machine_rank,
        "main_process_port": main_process_port,
        "rdzv_backend": "static",
        "same_network": True,
        "mixed_precision": "bf16" if on_gpu else "no",
        "use_cpu": False,  # a CPU class runs its processes with ACCELERATE_USE_CPU (gloo), see `launch_env`
        "distributed_type": "MULTI_GPU",
    }
    if record.num_nodes > 1:
        if not main_process_ip:
            raise ValueError("a job on several nodes needs the main node's address")
        config["main_process_ip"] = main_process_ip
    if record.distributed == "fsdp":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one unit per decoder layer
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",  # each process saves its shard: no gather at save
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False,
        }
    elif record.distributed in ("deepspeed_zero2", "deepspeed_zero3"):
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "zero_stage": 2 if record.distributed == "deepspeed_zero2" else 3,
            "gradient_accumulation_steps": hp.gradient_accumulation_steps if hp else 1,
            "gradient_clipping": hp.max_grad_norm if hp else 1.0,
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            "zero3_init_flag": False,  # LoRA wraps a model loaded whole; ZeRO-3 shards it at prepare()
            "zero3_save_16bit_model": True,
        }
    return config


def launch_env(record: JobRecord, *, on_gpu: bool, cpu_threads: int) -> dict[str, str]:
    """The launcher's environment: the worker's own, plus CPU processes' backend and thread share."""
    env = dict(os.environ)
    if not on_gpu:
        env["ACCELERATE_USE_CPU"] = "true"  # torchrun's processes then join over gloo
    # Each process its share of the node's cores (torchrun would leave one thread, the pod's limit would
    # oversubscribe them).
    env["OMP_NUM_THREADS"] = str(max(1, cpu_threads // record.num_gpus))
    return env


@dataclass
class LaunchSpec:
    """What every launched process needs to run its part of the job's training."""

    job_id: str
    attempt: int
    recipe: str  # "module:function", e.g. "services.trainer.recipes.sft:train_sft"
    config: Any  # the recipe's config, without the objects each process makes itself (storage, sink)
    total_steps: int
    workdir: Path
    result_path: Path
    main_pid_path: Path


@dataclass
class LaunchedResult:
    result: Any  # the recipe's result (None when it raised)
    budget_reason: str | None
    preempted: bool
    training_seconds: float
    error: JobError | None = None  # what the recipe raised, as the job's error
    expected: bool = True  # an error of the data or the request, not of Tunery


def run_launched(run: Any, recipe: str, config: Any, hooks: Any, total_steps: int) -> Any:
    """Run `recipe(config, hooks)` on the job's devices; the main process's result.

    `run` is the work horse's TrainingRun and `hooks` its ProgressHooks: their outcome (budget, preemption,
    training time) is set from the main training process, which also accounted the devices' time. A job on
    several nodes is announced to the trainer group's other ranks, which start their processes too.
    """
    record: JobRecord = run.record
    settings: Settings = run.settings
    on_gpu = record.gpu_class != "cpu"
    if record.distributed.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise JobFailure(
            "distributed_unavailable",
            f"distributed {record.distributed!r} needs DeepSpeed, which this trainer's image does not have; "
            "use fsdp, or install deepspeed in the trainer image",
            "distributed",
        )
    address = None
    if record.num_nodes > 1:
        if settings.trainer_nodes != record.num_nodes or not settings.trainer_main_address:
            raise JobFailure(
                "distributed_unavailable",
                f"a job on {record.num_nodes} nodes needs a trainer group of {record.num_nodes} nodes "
                "(TUNERY_TRAINER_NODES, TUNERY_TRAINER_MAIN_ADDRESS; k8s/README.md)",
                "num_nodes",
            )
        address = settings.trainer_main_address
    spec = _spec(record, recipe, config, total_steps, run.workdir)
    if record.num_nodes > 1:
        _await_followers(run)
        _announce(run, spec)
    accelerate = accelerate_config(
        record, on_gpu=on_gpu, main_process_ip=address, main_process_port=settings.trainer_rendezvous_port
    )
    process = _launch(
        spec, accelerate, launch_env(record, on_gpu=on_gpu, cpu_threads=settings.resolved_torch_threads)
    )

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(spec.main_pid_path.read_text()), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not spec.result_path.exists():
        # A process was killed or a node lost: the job goes back to its queue as a killed attempt would,
        # to carry on from its last checkpoint, and this attempt is over.
        reason = f"{world_size(record)} training processes, exit status {code}"
        recover_killed_task(settings, run.redis, TRAIN_TASK, [record.id, record.attempt], reason)
        raise StaleAttempt(f"{record.id} attempt {record.attempt}: training processes died ({reason})")
    outcome: LaunchedResult = pickle.loads(spec.result_path.read_bytes())
    hooks.budget_reason = outcome.budget_reason
    hooks.preempted = outcome.preempted
    hooks.training_seconds = outcome.training_seconds
    # The main training process accounted every device's time until it ended; carry on from here.
    hooks.started, hooks.accounted = time.monotonic(), 0.0
    if outcome.error is not None:
        raise JobFailure(outcome.error.code, outcome.error.message, outcome.error.param)
    return outcome.result


def _with(config: Any, **values: Any) -> Any:
    """The recipe's config with those of `values` it has (only SFT keeps a token cache)."""
    names = {f.name for f in fields(config)}
    return replace(config, **{k: v for k, v in values.items() if k in names})


def _spec(record: JobRecord, recipe: str, config: Any, total_steps: int, workdir: Path) -> LaunchSpec:
    folder = workdir / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    return LaunchSpec(
        job_id=record.id, attempt=record.attempt, recipe=recipe,
        config=_with(config, token_cache=None, checkpoints=None), total_steps=total_steps,
        workdir=workdir, result_path=folder / "result.pkl", main_pid_path=folder / "main.pid",
    )  # fmt: skip


def _launch(spec: LaunchSpec, accelerate: dict[str, Any], env: dict[str, str]) -> subprocess.Popen:
    folder = spec.result_path.parent
    config_path = folder / "accelerate.yaml"
    config_path.write_text(yaml.safe_dump(accelerate))
    spec_path = folder / "spec.pkl"
    spec_path.write_bytes(pickle.dumps(spec))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
        "-m", "services.trainer.launch", str(spec_path),
    ]  # fmt: skip
    log.info("launching %s training processes (rank %s): %s", accelerate["num_processes"],
             accelerate["machine_rank"], " ".join(command))  # fmt: skip
    return subprocess.Popen(command, env=env)


# -- several nodes: the trainer group's other ranks -------------------------------------------------------


def _group_key(main_address: str) -> str:
    return f"tunery:trainer-group:{main_address}:launch"


def _spec_key(record: JobRecord) -> str:
    return storage_keys.job_prefix(record.tenant, record.id) + f"launch/attempt-{record.attempt}.pkl"


def _announce(run: Any, spec: LaunchSpec) -> None:
    """Tell the group's other ranks to start their processes for this attempt (its spec is in storage)."""
    record: JobRecord = run.record
    run.storage.put_bytes(_spec_key(record), pickle.dumps(spec))
    announcement = {"job_id": record.id, "attempt": record.attempt, "spec_key": _spec_key(record)}
    run.redis.set(_group_key(run.settings.trainer_main_address), json.dumps(announcement), ex=24 * 3600)


def _presence_key(main_address: str, rank: int) -> str:
    return f"tunery:trainer-group:{main_address}:rank:{rank}"


def _await_followers(run: Any, timeout_seconds: float = FOLLOWERS_TIMEOUT_SECONDS) -> None:
    """Wait until every other rank of the group is following; a group with a member missing cannot train,
    and the attempt ends as a died one (retried, up to the job's attempts)."""
    settings: Settings = run.settings
    missing: list[int] = []
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        keys = [_presence_key(settings.trainer_main_address, r) for r in range(1, settings.trainer_nodes)]
        missing = [r + 1 for r, present in enumerate(run.redis.mget(keys)) if present is None]
        if not missing:
            return
        time.sleep(1)
    reason = f"trainer group ranks {missing} not following {settings.trainer_main_address}"
    recover_killed_task(settings, run.redis, TRAIN_TASK, [run.record.id, run.record.attempt], reason)
    raise StaleAttempt(f"{run.record.id} attempt {run.record.attempt}: {reason}")


class _Leaving:
    """SIGTERM to a follower: finish the attempt in progress (the group's checkpoint needs every rank),
    then stop following."""

    requested = False

    @classmethod
    def handle(cls, signum: int, frame: object) -> None:
        cls.requested = True


def follow_group(settings: Settings, poll_seconds: float = 1.0) -> None:
    """A trainer group's rank > 0: start this node's processes for each attempt rank 0 announces."""
    from shared.platform.runtime import connect

    if not settings.trainer_main_address:
        raise SystemExit("a trainer of rank > 0 needs TUNERY_TRAINER_MAIN_ADDRESS (its group's rank-0 pod)")
    signal.signal(signal.SIGTERM, _Leaving.handle)
    runtime = connect(settings)
    rank = settings.trainer_node_rank
    log.info(
        "trainer rank %d of %d following %s", rank, settings.trainer_nodes, settings.trainer_main_address
    )
    presence = _presence_key(settings.trainer_main_address, rank)
    done: tuple[str, int] | None = None
    while not _Leaving.requested:
        runtime.redis.set(presence, "1", ex=PRESENCE_TTL_SECONDS)
        raw = runtime.redis.get(_group_key(settings.trainer_main_address))
        announcement = json.loads(raw) if raw else None
        if announcement and (announcement["job_id"], announcement["attempt"]) != done:
            done = (announcement["job_id"], announcement["attempt"])
            record = runtime.jobs.get(announcement["job_id"])
            if record is not None and record.attempt == announcement["attempt"]:
                _follow(runtime, settings, record, announcement["spec_key"])
        time.sleep(poll_seconds)
    runtime.redis.delete(presence)
    log.info("trainer rank %d stopped following", rank)


def _follow(runtime: Any, settings: Settings, record: JobRecord, spec_key: str) -> None:
    """This node's processes for one attempt, with its own copies of the model and the checkpoint."""
    from shared.ml.materialize import materialize
    from shared.planning.catalog import load_catalog

    with tempfile.TemporaryDirectory(prefix=f"tunery-{record.id}-rank{settings.trainer_node_rank}-") as tmp:
        workdir = Path(tmp)
        leader: LaunchSpec = pickle.loads(runtime.storage.get_bytes(spec_key))
        entry = load_catalog(settings).get(record.model)
        if entry is None:
            return  # rank 0 fails the job
        resume = None
        if leader.config.resume_from is not None and record.resume_checkpoint is not None:
            resume = workdir / "resume"
            runtime.storage.download_prefix(record.resume_checkpoint.prefix, resume)
        config = replace(
            leader.config,
            model_dir=materialize(entry, settings),
            output_dir=workdir / "output",
            resume_from=resume,
        )
        spec = _spec(record, leader.recipe, config, leader.total_steps, workdir)
        on_gpu = record.gpu_class != "cpu"
        accelerate = accelerate_config(
            record, on_gpu=on_gpu, machine_rank=settings.trainer_node_rank,
            main_process_ip=settings.trainer_main_address, main_process_port=settings.trainer_rendezvous_port,
        )  # fmt: skip
        env = launch_env(record, on_gpu=on_gpu, cpu_threads=settings.resolved_torch_threads)
        code = _launch(spec, accelerate, env).wait()
        log.info("rank %d: processes of %s attempt %d ended (%d)", settings.trainer_node_rank, record.id,
                 record.attempt, code)  # fmt: skip


# -- every launched process -------------------------------------------------------------------------------


def main(spec_path: str) -> None:
    """One launched training process (see the module docstring)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from services.trainer.job_checkpoints import JobCheckpoints
    from services.trainer.run import Preemption, ProgressHooks, RunContext
    from shared.platform.failures import classify
    from shared.platform.runtime import connect

    spec: LaunchSpec = pickle.loads(Path(spec_path).read_bytes())
    # Joins the process group (which process is this?); on a CPU class over gloo, as the recipe's
    # Accelerator will (it reads ACCELERATE_USE_CPU, PartialState does not).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    runtime = connect()
    record = runtime.jobs.require(spec.job_id)
    if record.attempt != spec.attempt:
        raise SystemExit(f"attempt {spec.attempt} of {spec.job_id} is stale (the job is at {record.attempt})")
    run = RunContext(runtime.settings, runtime.redis, runtime.storage, runtime.jobs, record)
    run.workdir = spec.workdir
    if state.is_main_process:
        Preemption.install()
        spec.main_pid_path.write_text(str(os.getpid()))
    hooks = ProgressHooks(run, spec.total_steps)
    config = _with(
        spec.config,
        token_cache=runtime.storage,
        checkpoints=JobCheckpoints(runtime.settings, runtime.storage, runtime.jobs, record, hooks.send_rows),
        torch_threads=0,  # the launcher set this process's share (OMP_NUM_THREADS)
    )
    module, function = spec.recipe.split(":")
    try:
        result = getattr(importlib.import_module(module), function)(config, hooks)
        error, expected = None, True
    except Exception as exc:  # every process raises it; the main one reports it for the job
        log.exception("training failed")
        result, (error, expected) = None, classify(exc)
    if state.is_main_process:
        hooks.account()
        outcome = LaunchedResult(
            result, hooks.budget_reason, hooks.preempted, hooks.training_seconds, error, expected
        )
        spec.result_path.write_bytes(pickle.dumps(outcome))
    if error is not None:
        raise SystemExit(1)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Through the module's own name: what it pickles must name services.trainer.launch, not __main__.
    from services.trainer import launch

    launch.main(sys.argv[1])
