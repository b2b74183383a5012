"""The service's job queue, which lives in the archive: queue, cancel and resume a job.

What the API's scheduler and the CLI without a server (`ArchiveQueue`: `submit --db`, `cancel --db`,
`resume --db`) both do, so a job moves through the same states whichever way it is asked; light (no Ray, no
torch), so commands that only talk to the archive or a server start fast.
"""

from __future__ import annotations

from orchestrator.archive import Archive
from orchestrator.errors import Conflict
from orchestrator.jobspec import JobSpec
from orchestrator.records import JobStatus

SERVICE_OWNER = "service"
"""Owner of the jobs a service drives: `run` jobs (owner "") on the same database are never taken over."""
CANCELLABLE = (JobStatus.QUEUED, JobStatus.RUNNING)
RESUMABLE = (JobStatus.CANCELLED, JobStatus.FAILED)


class JobConflict(Conflict):
    """The job is in a state where the request makes no sense (cancel a finished job, resume a running one)."""


def queue_job(archive: Archive, spec: JobSpec) -> int:
    """Add a validated job at the back of the service's queue; returns its id."""
    return archive.create_job(spec.to_json(), spec.name, owner=SERVICE_OWNER, status=JobStatus.QUEUED)


def queued_jobs(archive: Archive) -> list[int]:
    """The service's queued jobs, in the order they joined the queue (a resumed job goes to the back)."""
    return [j.id for j in archive.jobs(status=JobStatus.QUEUED, owner=SERVICE_OWNER, by_queue=True)]


def require_status(archive: Archive, job_id: int, allowed: tuple[JobStatus, ...], action: str) -> None:
    """Refuse (409) a request the job's status forbids, naming what is allowed."""
    status = archive.job(job_id).status
    if status not in allowed:
        raise JobConflict(f"job {job_id} is {status}; only {' or '.join(allowed)} jobs can be {action}")


def cancel_in_archive(archive: Archive, job_id: int) -> None:
    """Mark a queued or running job cancelled; a driver running it notices and stops at its next step."""
    require_status(archive, job_id, CANCELLABLE, "cancelled")
    archive.set_status(job_id, JobStatus.CANCELLED)


def enqueue_again(archive: Archive, job_id: int) -> None:
    """Put a cancelled or failed job back in the service's queue (it resumes from its archive)."""
    require_status(archive, job_id, RESUMABLE, "resumed")
    archive.enqueue(job_id, SERVICE_OWNER)


class ArchiveQueue:
    """The service's queue without a server (`submit --db`, `cancel --db`, `resume --db`): a server using the
    archive starts, stops and resumes the jobs as if asked itself; no driver runs here."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def submit(self, spec: JobSpec) -> int:
        return queue_job(self.archive, spec)

    def cancel(self, job_id: int) -> None:
        cancel_in_archive(self.archive, job_id)

    def resume(self, job_id: int) -> None:
        enqueue_again(self.archive, job_id)

    def queue(self) -> list[int]:
        return queued_jobs(self.archive)

    def state(self, job_id: int) -> None:
        return None
