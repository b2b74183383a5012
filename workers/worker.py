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
from evaluators.lm_eval_adapter import LMEvalScorer, LMEvalTask, Split, load_lm_eval_task
from evaluators.tasks import Example, Task, TaskDataError, chunk, load_task
from evaluators.vllm_backend import VLLMBackend
from workers.materialize import MaterializeError, ResidentModel
from workers.recipe import Recipe, RecipeError
from workers.sources import SourceError, Sources, TokenizerSource

FailureKind = Literal["bad_recipe", "nan_output", "out_of_memory", "evaluation_error", "source_error"]


@dataclass
class TaskSetup:
    """A JSONL task folder (`path`), or an lm-eval task by name (`lm_eval`) or task file (`lm_eval_yaml`)."""

    name: str
    path: str | None = None
    metric: str | None = None
    max_new_tokens: int | None = None
    stop: list[str] | None = None
    lm_eval: str | None = None
    lm_eval_yaml: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    chat_template: bool = False


@dataclass
class WorkerSetup:
    """Everything a worker needs, as plain data (it travels to Ray actors)."""

    base: str
    experts: dict[str, str]
    tasks: list[TaskSetup]
    device: str = "cpu"
    batch_size: int = 32
    dev_subset: int = 64
    """Examples per dev chunk, unless an `evaluate` call says otherwise."""
    subset_seed: int = 0
    backend: str = "hf"
    threads: int | None = None
    tokenizer_source: TokenizerSource = "base"
    """The merged vocabulary when experts add tokens (`models.tokenizer_source`): `base` or `union`."""
    trust_remote_code: bool = False
    """Let transformers run the models' own code (the job's `trust_remote_code`)."""
    cache_bytes: int | None = None
    """Budget of each of the resident model's source cache, memo and spare layers (`workers.cache_gb`; None:
    `default_cache_bytes`, from the model's size)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Backend options; `engine_args`: keyword arguments for the vLLM engine (e.g. gpu_memory_utilization)."""


class WorkerStartError(ValueError):
    """A worker that could not start (unsupported model, missing tensor, out of memory, no such device). The
    message is one line naming the step and, from the sources, the model and tensor; the job ends with it."""


class ModelWorker:
    def __init__(self, setup: WorkerSetup | dict[str, Any], defer_start_error: bool = False) -> None:
        """Open the sources, build the resident model, load the tasks and start the backend.

        With `defer_start_error` (how the Ray pool starts actors) a failure is kept and raised by `ping` as a
        WorkerStartError: Ray reports an exception raised in an actor's constructor only as a traceback text,
        but one raised by a method as the exception itself, which the pool turns into the job's one-line error.
        """
        if isinstance(setup, dict):
            setup = WorkerSetup(**{**setup, "tasks": [TaskSetup(**t) for t in setup["tasks"]]})
        if setup.threads:
            torch.set_num_threads(setup.threads)
        self.setup = setup
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.start_error: str | None = None
        step = "opening the models"
        try:
            self.sources = Sources(
                Path(setup.base),
                {n: Path(p) for n, p in setup.experts.items()},
                tokenizer_source=setup.tokenizer_source,
                trust_remote_code=setup.trust_remote_code,
            )
            step = f"building the model of '{self.sources.base_name}' on {setup.device}"
            self.resident = ResidentModel(
                self.sources, device=setup.device, source_cache_bytes=setup.cache_bytes,
                trust_remote_code=setup.trust_remote_code,
            )
            step = "loading the tasks"
            self.tasks: list[Task | LMEvalTask] = [self._load_task(t) for t in setup.tasks]
            step = f"starting the {setup.backend} backend"
            hf = HFBackend(self.resident.tokenizer, device=setup.device, batch_size=setup.batch_size)
            self.backend: HFBackend | VLLMBackend = (
                VLLMBackend.start(setup.base, self.resident.model, hf, setup.extra.get("engine_args"))
                if setup.backend == "vllm"
                else hf
            )
            self.lm_eval = LMEvalScorer(self.resident.tokenizer, batch_size=setup.batch_size)
        except Exception as exc:
            if not defer_start_error:
                raise
            self.start_error = start_error_line(step, exc)

    def ping(self) -> str:
        """The worker's name once it is up; raises WorkerStartError if it could not start."""
        if self.start_error is not None:
            raise WorkerStartError(self.start_error)
        return self.name

    def _load_task(self, t: TaskSetup) -> Task | LMEvalTask:
        if t.path is None:
            yaml = Path(t.lm_eval_yaml) if t.lm_eval_yaml else None
            return load_lm_eval_task(
                t.name,
                task=t.lm_eval,
                yaml=yaml,
                metric=t.metric,
                limit=t.limit,
                seed=self.setup.subset_seed,
                num_fewshot=t.num_fewshot,
                chat_template=t.chat_template,
            )
        return load_task(
            t.name,
            Path(t.path),
            metric=t.metric,
            max_new_tokens=t.max_new_tokens,
            stop=tuple(t.stop) if t.stop else None,
            num_fewshot=t.num_fewshot or 0,
            chat_tokenizer=self.resident.tokenizer if t.chat_template else None,
            seed=self.setup.subset_seed,
        )

    def evaluate(
        self,
        recipe: dict[str, Any],
        subset: int = 0,
        splits: tuple[str, ...] = ("dev",),
        dev_subset: int | None = None,
    ) -> dict[str, Any]:
        """Materialize `recipe` and score it on dev chunk `subset` (-1: all of dev) of `dev_subset` examples
        (default: the setup's) and/or the test split."""
        chunk_size = self.setup.dev_subset if dev_subset is None else dev_subset
        started = time.perf_counter()
        try:
            parsed = Recipe.parse(recipe)
            stats = self.resident.materialize(parsed)
        except RecipeError as exc:
            return self._failure("bad_recipe", exc)
        except SourceError as exc:  # e.g. a NaN in a source tensor this recipe reads
            return self._failure("source_error", exc)
        except MaterializeError as exc:
            return self._failure("nan_output", exc)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            return self._failure("out_of_memory", exc)
        materialized = time.perf_counter()
        try:
            if isinstance(self.backend, VLLMBackend):
                self.backend.load_weights(self.resident.model)
            out: dict[str, Any] = {"ok": True, "worker": self.name, "sparsity": stats.sparsity}
            per_example: dict[str, list[float]] = {}
            for split in splits:
                scores: dict[str, float] = {}
                for task in self.tasks:
                    if split == "dev":
                        examples = chunk(task.dev, chunk_size, subset, self.setup.subset_seed)
                    else:
                        examples = task.test
                    values = self._score(task, split, examples)
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

    def _score(self, task: Task | LMEvalTask, split: Split, examples: list[Example]) -> list[float]:
        if isinstance(task, LMEvalTask):
            return self.lm_eval.evaluate(self.resident.model, task, split, examples)
        return self.backend.evaluate(self.resident.model, task, examples)

    def _failure(self, kind: FailureKind, exc: BaseException, detail: str | None = None) -> dict[str, Any]:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {
            "ok": False,
            "kind": kind,
            "error": f"{kind}: {message}",
            "detail": detail,
            "worker": self.name,
        }


def start_error_line(step: str, exc: BaseException) -> str:
    """One line for a failure while a worker starts: the step, what failed, and the error's first line (which,
    from Sources or the resident model, names the model and tensor)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        what = "out of memory"
    elif isinstance(exc, (SourceError, RecipeError, TaskDataError)):  # their message says what failed
        what = ""
    else:
        what = type(exc).__name__
    detail = ": ".join(part for part in (what, first) if part)
    return f"worker could not start ({step}): {detail}"
