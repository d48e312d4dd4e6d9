"""The evaluator process: an RQ worker on the `prepare` queue (data validation, estimates) and the
`eval` queue (base vs fine-tuned comparisons). Preparation is served first: it is short and a
user is waiting on it."""

from pathlib import Path

from shared.platform import worker
from shared.platform.queue import EVAL_QUEUE, EVALUATOR_QUEUES, PREPARE_QUEUE
from shared.platform.settings import Settings

# The modules of each queue's tasks, imported once by the worker rather than by every task.
TASK_MODULES = {
    PREPARE_QUEUE: ["services.evaluator.prepare"],
    EVAL_QUEUE: ["services.evaluator.task", "services.evaluator.standalone"],
}


def run_worker(settings: Settings, multiprocess_dir: Path | None, queues: list[str] | None = None) -> None:
    """Serve `queues` (default both). A CPU-only deployment can serve `prepare` alone and leave `eval`
    to GPU evaluators that scale to zero."""
    queues = list(queues or EVALUATOR_QUEUES)
    worker.run_worker(
        settings,
        "evaluator",
        queues,
        settings.evaluator_metrics_port,
        multiprocess_dir,
        preload=[module for name in queues for module in TASK_MODULES[name]],
    )
