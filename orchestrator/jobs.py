"""The application layer: what the API, the dashboard, the CLI and the local client ask of jobs, one way each.

List and get jobs (as `JobView`s), page through candidates, the best candidate, the events, submit, cancel,
resume, and the candidate to pull. `Jobs` reads the archive and moves jobs through a `JobQueue`: the service's
scheduler (with its live drivers) in the service, the archive's own queue (`jobqueue.ArchiveQueue`) without
one. Starting a job is `launch`'s; the queue's rules are `jobqueue`'s. Light: no torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from orchestrator.archive import Archive, Candidate, Job
from orchestrator.errors import Conflict, NotFound, Unavailable
from orchestrator.jobqueue import CANCELLABLE
from orchestrator.jobspec import JobSpec
from orchestrator.records import CandidateStatus, JobStatus, Kind
from orchestrator.views import CandidatePage, JobView, job_views


class JobQueue(Protocol):
    """What moves jobs: queue, cancel, resume, and what runs now."""

    def submit(self, spec: JobSpec) -> int: ...
    def cancel(self, job_id: int) -> None: ...
    def resume(self, job_id: int) -> None: ...
    def queue(self) -> list[int]:
        """Waiting job ids, in the order they will start."""

    def state(self, job_id: int) -> tuple[int, str] | None:
        """(workers, phase) of the driver running the job here; None if none does."""


@dataclass
class Jobs:
    archive: Archive
    queue: JobQueue | None = None
    """None while the service starts: reads work, views and moves are `Unavailable`."""

    def _queue(self) -> JobQueue:
        if self.queue is None:
            raise Unavailable("the service is starting")
        return self.queue

    # -- jobs -----------------------------------------------------------------------------------------------
    def views(self, jobs: list[Job]) -> list[JobView]:
        """Views of `jobs` with their queue positions and each running driver's workers and phase."""
        queue = self._queue()
        live = {job.id: state for job in jobs if (state := queue.state(job.id)) is not None}
        waiting = any(j.status in CANCELLABLE and j.id not in live for j in jobs)
        return job_views(self.archive, jobs, queue.queue() if waiting else [], live)

    def jobs(self, status: JobStatus | None = None) -> list[JobView]:
        return self.views(self.archive.jobs(status=status))

    def job(self, job_id: int) -> JobView:
        return self.views([self.archive.job(job_id)])[0]

    def submit(self, spec: JobSpec) -> JobView:
        """Queue a validated (and, for a server, confined) job."""
        return self.job(self._queue().submit(spec))

    def cancel(self, job_id: int) -> JobView:
        """Cancel a queued job at once, a running one at its driver's next step."""
        self.archive.job(job_id)
        self._queue().cancel(job_id)
        return self.job(job_id)

    def resume(self, job_id: int) -> JobView:
        """Queue a cancelled or failed job again; it continues from its archive and last checkpoint."""
        self.archive.job(job_id)
        self._queue().resume(job_id)
        return self.job(job_id)

    # -- candidates ---------------------------------------------------------------------------------------
    def candidates(
        self,
        job_id: int,
        kind: Kind | None = Kind.SEARCH,
        status: CandidateStatus | None = None,
        order: str = "fitness",
        descending: bool = True,
        limit: int = 50,
        offset: int = 0,
    ) -> CandidatePage:
        """A page of a job's candidates, filtered, sorted and paged in SQL (no fitness sorts last)."""
        self.archive.job(job_id)
        rows = self.archive.candidates(job_id, kind, status, order, descending, limit, offset)
        total = self.archive.count(job_id, kind, status)
        return CandidatePage(total=total, offset=offset, limit=limit, items=[c.to_json() for c in rows])

    def candidate(self, job_id: int, candidate_id: int | None = None) -> Candidate:
        """Candidate `candidate_id` of the job, or its best (the job's model) by default; NotFound if none."""
        self.archive.job(job_id)
        if candidate_id is not None:
            return self.archive.candidate(candidate_id, job_id)
        best = self.archive.best(job_id)
        if best is None:
            raise NotFound(f"job {job_id} has no finished candidate yet")
        return best

    def pullable(self, job_id: int, candidate_id: int | None = None) -> Candidate:
        """The candidate a pull or a download writes: `candidate`, which must have finished (Conflict)."""
        cand = self.candidate(job_id, candidate_id)
        if cand.status != CandidateStatus.DONE:
            raise Conflict(f"candidate {cand.id} is {cand.status}, not done")
        return cand

    def pull(self, job_id: int, out: Path, candidate_id: int | None = None) -> Path:
        """Write the candidate (the best by default) as a Hugging Face folder at `out`."""
        from orchestrator.pull import pull

        return pull(self.archive, self.pullable(job_id, candidate_id), out)

    def events(self, job_id: int, limit: int = 100) -> list[dict[str, Any]]:
        """The job's log, newest first."""
        self.archive.job(job_id)
        events = self.archive.events(job_id, limit)
        return [{"at": e.at, "level": e.level, "message": e.message} for e in events]


def reference_scores(archive: Archive, job_id: int) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """The finished references' scores by name, and the ideal model's (per split and task, the best expert's)."""
    refs = {
        c.name: {"dev": c.dev, "test": c.test, "fitness": c.fitness}
        for c in archive.candidates(job_id, kind=Kind.REFERENCE, status=CandidateStatus.DONE)
    }
    experts = {n.split(":", 1)[1]: r for n, r in refs.items() if n and n.startswith("expert:")}
    ideal: dict[str, dict[str, float]] = {}
    if experts:
        for split in ("dev", "test"):
            tasks = next(iter(experts.values()))[split] or {}
            ideal[split] = {t: max((r[split] or {}).get(t, 0.0) for r in experts.values()) for t in tasks}
    return refs, ideal


def job_report(archive: Archive, job_id: int) -> dict[str, Any]:
    """The summary `run --json` prints: references, the ideal model, the best candidate."""
    refs, ideal = reference_scores(archive, job_id)
    best = archive.best(job_id)
    counts = archive.counts(job_id)
    job = archive.job(job_id)
    return {
        "job_id": job_id,
        "status": job.status,
        "evaluations": counts.get(CandidateStatus.DONE, 0) + counts.get(CandidateStatus.FAILED, 0),
        "failed": counts.get(CandidateStatus.FAILED, 0),
        "best": None
        if best is None
        else {
            "id": best.id,
            "recipe": best.recipe,
            "fitness": best.fitness,
            "dev": best.dev,
            "dev_full": (best.info or {}).get("dev_full"),
            "chosen_from": (best.info or {}).get("source") if best.kind == Kind.FINAL else None,
            "test": best.test,
            "sparsity": best.sparsity,
        },
        "references": refs,
        "ideal": ideal,
    }
