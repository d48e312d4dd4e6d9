"""The evaluator process: an RQ worker on the `eval` queue."""

from pathlib import Path

from shared import worker
from shared.queue import EVAL_QUEUE
from shared.settings import Settings


def run_worker(settings: Settings, multiprocess_dir: Path | None) -> None:
    worker.run_worker(settings, "evaluator", [EVAL_QUEUE], settings.evaluator_metrics_port, multiprocess_dir)
