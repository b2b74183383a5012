"""`mergesearch status`: jobs and their progress, from a server or straight from the archive."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from orchestrator.cli import DbOption, JsonOption, ServerOption, app, console, print_json, user_errors


def jobs_table(views: list[dict[str, Any]]) -> Table:
    table = Table(title="jobs")
    for col in ("id", "name", "status", "progress", "best", "queue", "workers", "strategy"):
        table.add_column(col, justify="right" if col in ("id", "progress", "best", "queue", "workers") else "left")
    for v in views:
        failed = f" ({v['failed']} failed)" if v["failed"] else ""
        table.add_row(
            str(v["id"]), v["name"], v["status"], f"{v['done'] + v['failed']}/{v['budget']}{failed}",
            f"{v['best_fitness']:.3f}" if v["best_fitness"] is not None else "–",
            str(v["queue_position"] or ""), str(v["workers"] or ""), v["strategy"],
        )
    return table


@app.command()
@user_errors
def status(
    job_id: Annotated[int | None, typer.Argument(help="One job (default: every job).")] = None,
    server: ServerOption = None,
    db: DbOption = None,
    watch: Annotated[bool, typer.Option("--watch", help="A live view, refreshed until the job ends.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Progress: done / failed / budget, best fitness, queue position, workers."""
    from orchestrator.service.client import jobs_client

    client = jobs_client(server, db)
    if watch:
        try:
            from orchestrator.dashboard.watch import watch as live_view
        except ModuleNotFoundError as exc:
            if exc.name not in ("orchestrator.dashboard", "orchestrator.dashboard.watch"):
                raise
            raise ValueError("--watch needs the dashboard (orchestrator.dashboard.watch), not installed") from None
        live_view(client, job_id)
        return
    views = [client.job(job_id)] if job_id is not None else client.jobs()
    if json_out:
        print_json(views[0] if job_id is not None else views)
        return
    console.print(jobs_table(views))
    if job_id is not None and views[0]["error"]:
        console.print(f"[red]error:[/red] {views[0]['error']}", highlight=False)
