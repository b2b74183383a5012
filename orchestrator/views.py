"""What the API (and the CLI without a server) shows of a job: the archive's counts plus the live driver."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from annotated_types import Ge, Le
from pydantic import BaseModel

from orchestrator.archive import MAX_ID, Archive, Job
from orchestrator.records import CandidateStatus

RowId = Annotated[int, Ge(1), Le(MAX_ID)]
"""A job or candidate id in a request: what the archive's ids can be (beyond: 422, not a database error)."""
Offset = Annotated[int, Ge(0), Le(MAX_ID)]


class JobView(BaseModel):
    id: int
    name: str
    status: str
    owner: str
    strategy: str
    budget: int
    done: int
    """Search candidates finished with a score."""
    failed: int
    """Search candidates recorded as failed (they count toward the budget)."""
    pending: int
    running: int
    best_fitness: float | None
    """The job's model's (`Archive.best`): its finalist's whole-dev score once finalists are scored."""
    best_search_fitness: float | None
    """The best search candidate's score (on its dev chunk): the one the candidates table marks."""
    queue_position: int | None
    """1-based place in the queue while the job waits; None otherwise."""
    workers: int | None
    """Workers the job holds now (its fair share), while it runs in this service."""
    phase: str | None
    error: str | None
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class CandidatePage(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[dict[str, Any]]


def job_views(
    archive: Archive,
    jobs: list[Job],
    queue: list[int],
    live: dict[int, tuple[int, str | None]] | None = None,
) -> list[JobView]:
    """Views of `jobs` in two grouped queries; `queue` gives positions, `live` maps job → (workers, phase)."""
    tallies = archive.tallies([j.id for j in jobs])
    live = live or {}
    views = []
    for job in jobs:
        counts, (workers, phase) = tallies[job.id]["counts"], live.get(job.id, (None, None))
        views.append(
            JobView(
                id=job.id,
                name=job.name,
                status=job.status,
                owner=job.owner,
                strategy=job.strategy,
                budget=job.budget,
                done=counts.get(CandidateStatus.DONE, 0),
                failed=counts.get(CandidateStatus.FAILED, 0),
                pending=counts.get(CandidateStatus.PENDING, 0),
                running=counts.get(CandidateStatus.RUNNING, 0),
                best_fitness=tallies[job.id]["best"],
                best_search_fitness=tallies[job.id]["best_search"],
                queue_position=queue.index(job.id) + 1 if job.id in queue else None,
                workers=workers,
                phase=phase,
                error=job.error,
                created_at=job.created_at,
                queued_at=job.queued_at,
                started_at=job.started_at,
                finished_at=job.finished_at,
            )
        )
    return views
