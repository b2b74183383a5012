"""`mergesearch resume`: queue a cancelled or failed job again; it continues from its archive."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.cli import DbOption, JsonOption, ServerOption, app, console, print_json, user_errors


@app.command()
@user_errors
def resume(
    job_id: Annotated[int, typer.Argument(help="The job.")],
    server: ServerOption = None,
    db: DbOption = None,
    json_out: JsonOption = False,
) -> None:
    """Resume a job from its last checkpoint: no candidate is lost or evaluated twice."""
    from orchestrator.service.client import jobs_client

    view = jobs_client(server, db).resume(job_id)
    if json_out:
        print_json(view)
        return
    where = f", position {view['queue_position']} in the queue" if view["queue_position"] else ""
    console.print(f"job {job_id} {view['status']}{where}")
