"""The trainer process: an RQ worker on `train:<gpu class>`."""

from pathlib import Path

from shared import worker
from shared.queue import train_queue_name
from shared.settings import Settings


def run_worker(settings: Settings, multiprocess_dir: Path | None) -> None:
    worker.run_worker(
        settings,
        "trainer",
        [train_queue_name(settings.gpu_class)],
        settings.trainer_metrics_port,
        multiprocess_dir,
    )
