"""Task formats, metrics, subset sampling and model backends. Imports nothing else of mergesearch."""

from evaluators.hf import HFBackend
from evaluators.metrics import METRICS, check_metric, metric_for, normalize
from evaluators.tasks import Example, Task, TaskDataError, chunk, load_task, num_chunks

__all__ = [
    "METRICS",
    "Example",
    "HFBackend",
    "Task",
    "TaskDataError",
    "check_metric",
    "chunk",
    "load_task",
    "metric_for",
    "normalize",
    "num_chunks",
]
