"""What the API's and the dashboard's routes depend on: the archive, the scheduler, and job views with the
scheduler's live state. A module of its own so that the dashboard's routes need not import the app that
includes them."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from orchestrator.archive import Archive, Job
from orchestrator.errors import Unavailable
from orchestrator.jobqueue import CANCELLABLE
from orchestrator.service.scheduler import Scheduler
from orchestrator.service.views import JobView, job_views


def get_archive(request: Request) -> Archive:
    return request.app.state.archive


def get_scheduler(request: Request) -> Scheduler:
    scheduler: Scheduler | None = request.app.state.scheduler
    if scheduler is None:
        raise Unavailable("the service is starting")
    return scheduler


ArchiveDep = Annotated[Archive, Depends(get_archive)]
SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]


def views(scheduler: Scheduler, jobs: list[Job]) -> list[JobView]:
    """Job views with the scheduler's queue positions and each running driver's workers and phase."""
    live = {}
    for job in jobs:
        rj = scheduler.live(job.id)
        if rj is not None:
            live[job.id] = (rj.workers, rj.progress.phase if rj.progress else "starting")
    waiting = any(j.status in CANCELLABLE and j.id not in live for j in jobs)
    return job_views(scheduler.archive, jobs, scheduler.queue() if waiting else [], live)
