"""The evaluator process: an RQ worker on the `prepare` queue (data validation, estimates) and the
`eval` queue (base vs fine-tuned comparisons). Preparation is served first: it is short and a
user is waiting on it."""

from pathlib import Path

from shared import worker
from shared.queue import EVAL_QUEUE, PREPARE_QUEUE
from shared.settings import Settings


def run_worker(settings: Settings, multiprocess_dir: Path | None) -> None:
    worker.run_worker(
        settings, "evaluator", [PREPARE_QUEUE, EVAL_QUEUE], settings.evaluator_metrics_port, multiprocess_dir
    )
