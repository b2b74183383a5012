"""`mergesearch inspect-policy`: the learned merge map of an RMM job, from its last checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from orchestrator.archive import Archive
from orchestrator.cli import DbOption, JsonOption, app, console, print_json, user_errors
from orchestrator.errors import NotFound, UserError


@app.command("inspect-policy")
@user_errors
def inspect_policy(
    job_id: Annotated[int, typer.Argument(help="An RMM job.")],
    plot: Annotated[Path | None, typer.Option(help="Write the merge map as a heatmap PNG.")] = None,
    db: DbOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show the deterministic policy's merge map (layer × source counts) of an RMM job."""
    from search.rmm.plot import plot_merge_map, policy_merge_map

    archive = Archive(db)
    job = archive.job(job_id)
    if job.strategy != "rmm":
        raise UserError(f"job {job_id} ran strategy '{job.strategy}', not rmm: it has no policy")
    checkpoint = archive.last_checkpoint(job_id)
    if checkpoint is None:
        raise NotFound(f"job {job_id} has no checkpoint yet")
    merge_map = policy_merge_map(checkpoint.state)
    if plot is not None:
        plot_merge_map(merge_map.count_map, merge_map.layer_labels, merge_map.action_labels, plot)
    if json_out:
        print_json({"job_id": job_id, "step": checkpoint.step, **merge_map._asdict(), "plot": str(plot) if plot else None})
        return
    table = Table(title=f"job {job_id}: policy merge map at step {checkpoint.step}")
    table.add_column("layer")
    for label in merge_map.action_labels:
        table.add_column(label, justify="right")
    for label, row in zip(merge_map.layer_labels, merge_map.count_map):
        table.add_row(label, *(f"{v:g}" if v else "·" for v in row))
    console.print(table)
    if plot is not None:
        console.print(f"wrote {plot}")
