"""The RQ worker both the trainer and the evaluator run.

RQ forks a work horse per task. The parent imports the task modules (torch, transformers, peft) once
before it serves, so that a horse starts at once instead of spending seconds on imports for every
task; it never runs a tensor operation (the OpenMP pool is not started before a fork) and never
initialises CUDA (availability checks go through NVML). On SIGTERM RQ would wait for the task to finish (hours) and then
be SIGKILLed by Kubernetes, so this worker passes the signal on to the work horse, whose task
stops at its next step, saves a checkpoint and hands its job back to the queue. A horse still busy
after TUNERY_STOP_GRACE_SECONDS is killed: its job then carries on from its previous checkpoint.

A work horse never outlives its worker: it closes the inherited /metrics socket at once (a restarted
worker must be able to bind its port again) and watches its parent; when the worker is gone
(SIGKILL, a crash) the horse stops as on SIGTERM and is gone for good after the stop grace. Redis
commands ride out a Redis restart (shared.platform.redis_connection) instead of crashing the worker.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from rq import SimpleWorker, Worker
from rq.serializers import JSONSerializer
from rq.worker import BaseWorker

from shared.platform import metrics
from shared.platform.queue import queue
from shared.platform.recovery import recover_killed_task
from shared.platform.redis_connection import connect_redis
from shared.platform.settings import Settings

log = logging.getLogger(__name__)

# The (service, outcome) series each worker's tasks report in tunery_worker_tasks_total.
OUTCOMES = {
    "trainer": [("trainer", "trained"), ("trainer", "budget"), ("trainer", "failed")],
    "evaluator": [
        ("evaluator", "succeeded"),
        ("evaluator", "failed"),
        ("prepare", "queued"),
        ("prepare", "failed"),
    ],
    # rejected: the request cannot be answered (too long a prompt, a template error); failed: a crash.
    "inference": [("inference", "succeeded"), ("inference", "rejected"), ("inference", "failed")],
}


class TuneryWorker(BaseWorker):
    """What every Tunery worker has: its settings, its /metrics server, and a stop that takes a second."""

    settings: Settings
    metrics_server: WSGIServer | None = None

    def subscribe(self) -> None:
        """As RQ's, with a listener that polls every second rather than every minute: redis-py's
        `PubSubWorkerThread.stop()` waits for the poll to end, which held every stop for up to 60 s."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=1, daemon=True, exception_handler=self._pubsub_exception_handler
        )


class InProcessWorker(TuneryWorker, SimpleWorker):
    """Runs each task in the worker process itself (RQ's SimpleWorker), so what a task loads stays loaded."""


class PreemptibleWorker(TuneryWorker, Worker):
    # The horse this worker itself killed at the end of a stop grace: a fault of the platform, not the job's.
    killed_on_stop: int | None = None

    def main_work_horse(self, job, queue):  # type: ignore[no-untyped-def]
        if self.metrics_server is not None:
            self.metrics_server.socket.close()
        watchdog = threading.Thread(
            target=_stop_when_orphaned, args=(os.getppid(), self.settings.stop_grace_seconds), daemon=True
        )
        watchdog.start()
        super().main_work_horse(job, queue)

    def handle_work_horse_killed(self, job, retpid, ret_val, rusage):  # type: ignore[no-untyped-def]
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        reason = (
            f"signal {os.WTERMSIG(ret_val)}"
            if os.WIFSIGNALED(ret_val)
            else f"exit status {os.WEXITSTATUS(ret_val)}"
        )
        infrastructure = retpid is not None and retpid == self.killed_on_stop
        recover_killed_task(
            self.settings,
            self.connection,
            job.func_name,
            list(job.args),
            reason,
            infrastructure=infrastructure,
        )

    def request_stop(self, signum, frame):  # type: ignore[no-untyped-def]
        if self.horse_pid:
            horse = self.horse_pid
            log.info("passing signal %s on to work horse %s", signum, horse)
            with contextlib.suppress(ProcessLookupError):
                os.kill(horse, signal.SIGTERM)
            timer = threading.Timer(self.settings.stop_grace_seconds, self._kill_horse, args=(horse,))
            timer.daemon = True
            timer.start()
        super().request_stop(signum, frame)

    def _kill_horse(self, pid: int) -> None:
        if self.horse_pid == pid:
            log.warning(
                "work horse %s still busy %.0f s after SIGTERM: killing it",
                pid,
                self.settings.stop_grace_seconds,
            )
            self.killed_on_stop = pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _stop_when_orphaned(worker_pid: int, grace_seconds: float) -> None:
    """In a work horse: once its worker is gone, stop the task as a shutdown would (SIGTERM: a trainer saves
    a checkpoint and hands its job back), and end the horse for good after the stop grace."""
    while os.getppid() == worker_pid:
        time.sleep(1.0)
    log.warning("worker %s is gone: stopping its work horse %s", worker_pid, os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_seconds)
    os.kill(os.getpid(), signal.SIGKILL)


def run_worker(
    settings: Settings,
    service: str,
    queue_names: list[str],
    metrics_port: int,
    multiprocess_dir: Path | None,
    worker_class: type[TuneryWorker] = PreemptibleWorker,
    preload: Sequence[str] = (),
) -> None:
    """Serve `queue_names` until stopped, with the task modules `preload` imported first. With
    `worker_class` InProcessWorker, tasks run in this process instead of a forked work horse, which is
    what keeps the inference worker's models loaded between them."""
    # torch.cuda.is_available() through NVML: the CUDA driver must not be initialised before a fork.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    # Thread pools sized by the CPUs this process may use, not the host's (set before torch is imported).
    os.environ.setdefault("OMP_NUM_THREADS", str(settings.resolved_torch_threads))
    for module in preload:
        importlib.import_module(module)
    metrics_server, _ = start_http_server(
        metrics_port, addr=settings.metrics_host, registry=metrics.registry(multiprocess_dir)
    )
    redis = connect_redis(settings.effective_redis_url, settings.redis_outage_seconds)
    worker = worker_class(
        [queue(redis, name) for name in queue_names],
        connection=redis,
        serializer=JSONSerializer,
        name=f"{service}-{socket.gethostname()}-{os.getpid()}",
        job_monitoring_interval=settings.worker_heartbeat_seconds,
    )
    worker.settings = settings
    worker.metrics_server = metrics_server
    for label, outcome in OUTCOMES.get(service, ()):
        # Created at zero, so a first failure shows as an increase rather than a new series.
        metrics.TASKS_FINISHED.labels(label, outcome)
    log.info("%s worker listening on %s; metrics on :%s", service, ", ".join(queue_names), metrics_port)
    worker.work(logging_level=settings.log_level.upper(), with_scheduler=False)
