"""`mergesearch submit`: queue a job on a server (or in the archive, for a server that uses it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli import DbOption, JsonOption, ServerOption, app, console, print_json, user_errors


@app.command()
@user_errors
def submit(
    job_file: Annotated[Path, typer.Argument(help="The job YAML (the same as for `run`).")],
    server: ServerOption = None,
    db: DbOption = None,
    root: Annotated[
        str | None,
        typer.Option(help="Server folder the job's relative paths resolve against (default: the job file's folder)."),
    ] = None,
    data_root: Annotated[
        list[Path] | None,
        typer.Option(help="With --db: the server's data roots, which the job's paths must lie under "
                          "(repeat for several). Default: ~/.mergesearch."),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Queue a job; it starts when a driver slot and a fair share of workers are free."""
    from orchestrator.service.client import jobs_client

    view = jobs_client(server, db, data_root).submit(job_file, root)
    if json_out:
        print_json(view)
        return
    where = f", position {view['queue_position']} in the queue" if view["queue_position"] else ""
    console.print(f"job {view['id']} {view['status']}{where}")
