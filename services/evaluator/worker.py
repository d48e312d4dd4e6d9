"""The evaluator process: an RQ worker on the `prepare` queue (data validation, estimates) and the
`eval` queue (base vs fine-tuned comparisons). Preparation is served first: it is short and a
user is waiting on it."""

from pathlib import Path

from shared import worker
from shared.queue import EVALUATOR_QUEUES
from shared.settings import Settings


def run_worker(settings: Settings, multiprocess_dir: Path | None, queues: list[str] | None = None) -> None:
    """Serve `queues` (default both). A CPU-only deployment can serve `prepare` alone and leave `eval`
    to GPU evaluators that scale to zero."""
    worker.run_worker(
        settings,
        "evaluator",
        list(queues or EVALUATOR_QUEUES),
        settings.evaluator_metrics_port,
        multiprocess_dir,
    )
