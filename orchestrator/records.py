"""The typed core the archive, the driver, the service and the views share: statuses, kinds, and what one
evaluation of a candidate came to (`Evaluation` or `Failure`, with fitness defined once, here).

A worker sends a plain dict across Ray (`ok`, `dev`, `test`, `per_example`, `sparsity`, `timings`, `worker`, or
`ok: false` with `error`); `outcome` reads it once into a record, and everything after works with the record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ENDED = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)
"""Job statuses with a `finished_at`."""


class CandidateStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


UNFINISHED = (CandidateStatus.PENDING, CandidateStatus.RUNNING)
FINISHED = (CandidateStatus.DONE, CandidateStatus.FAILED)


class Kind(StrEnum):
    """Why a candidate exists: the search asked it, it is a static reference, or a final re-test."""

    SEARCH = "search"
    REFERENCE = "reference"
    FINAL = "final"


def fitness(scores: Mapping[str, float]) -> float:
    """The plain mean of per-task scores (0.0 with no task): a job's fitness unless its `objective` weighs or
    normalises tasks (the driver's `Objective`), and the "mean" column of tables."""
    return sum(scores.values()) / max(len(scores), 1)


@dataclass(frozen=True)
class Evaluation:
    """A candidate scored by a worker, with the job's fitness of its dev scores."""

    dev: dict[str, float]
    fitness: float
    test: dict[str, float] | None = None
    per_example: dict[str, list[float]] | None = None
    sparsity: float | None = None
    timings: dict[str, float] | None = None
    worker: str | None = None

    def columns(self) -> dict[str, Any]:
        """The archive's columns for it (`test` only when it was scored, so a dev-only result keeps one)."""
        values: dict[str, Any] = {
            "status": CandidateStatus.DONE,
            "dev": self.dev,
            "fitness": self.fitness,
            "per_example": self.per_example,
            "sparsity": self.sparsity,
            "timings": self.timings,
            "worker": self.worker,
            "error": None,
        }
        if self.test is not None:
            values["test"] = self.test
        return values


@dataclass(frozen=True)
class Failure:
    """A candidate a worker could not score (a bad recipe, NaN output, out of memory, a lost worker...)."""

    error: str | None
    worker: str | None = None

    def columns(self) -> dict[str, Any]:
        return {"status": CandidateStatus.FAILED, "error": self.error, "worker": self.worker}


def outcome(
    output: Mapping[str, Any], objective: Callable[[dict[str, float]], float] = fitness
) -> Evaluation | Failure:
    """Read a worker's output dict; `objective` is the job's fitness (the driver's `Objective`)."""
    if not output.get("ok"):
        return Failure(error=output.get("error"), worker=output.get("worker"))
    dev = dict(output.get("dev") or {})
    return Evaluation(
        dev=dev,
        fitness=objective(dev),
        test=output.get("test"),
        per_example=output.get("per_example"),
        sparsity=output.get("sparsity"),
        timings=output.get("timings"),
        worker=output.get("worker"),
    )
