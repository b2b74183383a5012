"""The worker: one resident model and one evaluator per GPU or CPU slot.

`ModelWorker` is a plain class, so it is testable without Ray; the orchestrator wraps it in a Ray actor
(`ray.remote(ModelWorker)`). It opens the sources once, materializes each recipe in place into its resident
model, scores it, and returns a plain dict: a result or a typed failure. It never raises for a bad candidate,
so a candidate can never crash the driver.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from evaluators.hf import HFBackend
from evaluators.tasks import Task, chunk, load_task
from workers.materialize import MaterializeError, ResidentModel
from workers.recipe import Recipe, RecipeError
from workers.sources import SourceError, Sources

FailureKind = Literal["bad_recipe", "nan_output", "out_of_memory", "evaluation_error", "source_error"]


@dataclass
class TaskSetup:
    name: str
    path: str
    metric: str | None = None
    max_new_tokens: int | None = None
    stop: list[str] | None = None


@dataclass
class WorkerSetup:
    """Everything a worker needs, as plain data (it travels to Ray actors)."""

    base: str
    experts: dict[str, str]
    tasks: list[TaskSetup]
    device: str = "cpu"
    batch_size: int = 32
    dev_subset: int = 64
    subset_seed: int = 0
    backend: str = "hf"
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ModelWorker:
    def __init__(self, setup: WorkerSetup | dict[str, Any]) -> None:
        if isinstance(setup, dict):
            setup = WorkerSetup(**{**setup, "tasks": [TaskSetup(**t) for t in setup["tasks"]]})
        if setup.threads:
            torch.set_num_threads(setup.threads)
        self.setup = setup
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.sources = Sources(Path(setup.base), {n: Path(p) for n, p in setup.experts.items()})
        self.resident = ResidentModel(self.sources, device=setup.device)
        self.tasks: list[Task] = [
            load_task(
                t.name,
                Path(t.path),
                metric=t.metric,
                max_new_tokens=t.max_new_tokens,
                stop=tuple(t.stop) if t.stop else None,
            )
            for t in setup.tasks
        ]
        self.backend = HFBackend(self.resident.tokenizer, device=setup.device, batch_size=setup.batch_size)

    def ping(self) -> str:
        return self.name

    def evaluate(self, recipe: dict[str, Any], subset: int = 0, splits: tuple[str, ...] = ("dev",)) -> dict[str, Any]:
        """Materialize `recipe` and score it on dev chunk `subset` (-1: all of dev) and/or the test split."""
        started = time.perf_counter()
        try:
            parsed = Recipe.parse(recipe)
            stats = self.resident.materialize(parsed)
        except (RecipeError, SourceError) as exc:
            return self._failure("bad_recipe", exc)
        except MaterializeError as exc:
            return self._failure("nan_output", exc)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            return self._failure("out_of_memory", exc)
        materialized = time.perf_counter()
        try:
            out: dict[str, Any] = {"ok": True, "worker": self.name, "sparsity": stats.sparsity}
            per_example: dict[str, list[float]] = {}
            for split in splits:
                scores: dict[str, float] = {}
                for task in self.tasks:
                    if split == "dev":
                        examples = chunk(task.dev, self.setup.dev_subset, subset, self.setup.subset_seed)
                    else:
                        examples = task.test
                    values = self.backend.evaluate(self.resident.model, task, examples)
                    scores[task.name] = sum(values) / max(len(values), 1)
                    if split == "dev":
                        per_example[task.name] = values
                out[split] = scores
            out["per_example"] = per_example
        except (torch.OutOfMemoryError, MemoryError) as exc:
            return self._failure("out_of_memory", exc)
        except Exception as exc:  # noqa: BLE001 — any evaluation bug becomes a recorded failure, not a crash
            return self._failure("evaluation_error", exc, detail=traceback.format_exc(limit=3))
        done = time.perf_counter()
        out["timings"] = {"materialize": materialized - started, "evaluate": done - materialized}
        return out

    def _failure(self, kind: FailureKind, exc: BaseException, detail: str | None = None) -> dict[str, Any]:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {"ok": False, "kind": kind, "error": f"{kind}: {message}", "detail": detail, "worker": self.name}
