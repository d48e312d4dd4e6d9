"""The inference process: an RQ worker on the `inference` queue that answers smoke-test chat completions
and classifications.

Unlike the trainer and the evaluator it does not fork a work horse per task (shared.platform.worker.InProcessWorker): tasks run
in this process, so the models they load stay in memory for the next request.
"""

from pathlib import Path

from shared.platform import worker
from shared.platform.queue import INFERENCE_QUEUE
from shared.platform.settings import Settings


def run_worker(settings: Settings, multiprocess_dir: Path | None) -> None:
    worker.run_worker(
        settings,
        "inference",
        [INFERENCE_QUEUE],
        settings.inference_metrics_port,
        multiprocess_dir,
        worker_class=worker.InProcessWorker,
        # Imported now, not on the first request: torch and transformers take seconds to import.
        preload=["services.inference.task"],
    )
