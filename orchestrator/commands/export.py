"""`mergesearch export`: an archived candidate as a mergekit YAML, saying which parts mergekit cannot express."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator.archive import Archive
from orchestrator.cli import DbOption, app, console, err, user_errors
from orchestrator.jobs import Jobs


@app.command()
@user_errors
def export(
    job_id: Annotated[int, typer.Argument(help="The job.")],
    candidate: Annotated[int | None, typer.Option(help="Candidate id (default: the best).")] = None,
    format: Annotated[str, typer.Option("--format", help="Output format: mergekit.")] = "mergekit",
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
    db: DbOption = None,
) -> None:
    """Write a candidate's recipe as a mergekit YAML; parts mergekit cannot express are listed on stderr."""
    from workers.mergekit_config import recipe_to_mergekit
    from workers.recipe import Recipe

    if format != "mergekit":
        raise ValueError(f"--format: unknown format '{format}' (known: mergekit)")
    archive = Archive(db)
    cand = Jobs(archive).candidate(job_id, candidate)
    models = archive.job(job_id).spec["models"]
    sources = {"base": str(models["base"]), **{n: str(p) for n, p in models["experts"].items()}}
    text, problems = recipe_to_mergekit(Recipe.parse(cand.recipe), sources)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        console.print(f"wrote {out}")
    for problem in problems:
        err.print(f"[yellow]not expressible in mergekit:[/yellow] {problem}", highlight=False, soft_wrap=True)
