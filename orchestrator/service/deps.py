"""What the API's and the dashboard's routes depend on: the archive, and the application layer (`Jobs`) over
it and the scheduler. A module of its own so that the dashboard's routes need not import the app that includes
them."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from orchestrator.archive import Archive
from orchestrator.jobs import Jobs


def get_archive(request: Request) -> Archive:
    return request.app.state.archive


def get_jobs(request: Request) -> Jobs:
    """The service's jobs: its archive, moved by its scheduler (None while it starts: reads only)."""
    return Jobs(request.app.state.archive, request.app.state.scheduler)


ArchiveDep = Annotated[Archive, Depends(get_archive)]
JobsDep = Annotated[Jobs, Depends(get_jobs)]
