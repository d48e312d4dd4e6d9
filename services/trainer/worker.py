"""The trainer process: an RQ worker on `train:<gpu class>`, or on `train:<gpu class>:nodes-<n>` as rank 0 of
a trainer group of n nodes, whose other ranks follow it (services.trainer.launch.follow_group)."""

from pathlib import Path

from shared.platform import worker
from shared.platform.queue import train_queue_name
from shared.platform.settings import Settings


def run_worker(settings: Settings, multiprocess_dir: Path | None) -> None:
    if settings.trainer_node_rank > 0:
        from services.trainer.launch import follow_group

        follow_group(settings)
        return
    worker.run_worker(
        settings,
        "trainer",
        [train_queue_name(settings.gpu_class, settings.trainer_nodes)],
        settings.trainer_metrics_port,
        multiprocess_dir,
        preload=["services.trainer.task"],
    )
