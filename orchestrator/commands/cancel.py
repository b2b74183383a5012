"""`mergesearch cancel`: stop a queued or running job; its archived candidates stay."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.cli import DbOption, JsonOption, ServerOption, app, console, print_json, user_errors
from orchestrator.records import JobStatus


@app.command()
@user_errors
def cancel(
    job_id: Annotated[int, typer.Argument(help="The job.")],
    server: ServerOption = None,
    db: DbOption = None,
    json_out: JsonOption = False,
) -> None:
    """Cancel a job: a queued one at once, a running one at its driver's next step."""
    from orchestrator.service.client import jobs_client

    view = jobs_client(server, db).cancel(job_id)
    if json_out:
        print_json(view)
        return
    console.print(f"job {job_id} {view['status']}" + (" (stopping)" if view["status"] == JobStatus.RUNNING else ""))
