"""The `mergesearch` command line. Commands beyond the core live in `orchestrator/commands/`, one per module.

Every command that prints a table takes `--json`; errors a user can cause print one line and exit 2.
"""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.archive import Archive
from orchestrator.errors import MergesearchError, outcome
from orchestrator.jobspec import JobSpec, load_job, with_overrides
from orchestrator.records import CandidateStatus, JobStatus, Kind, fitness

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Search for the best merge of fine-tuned checkpoints.")
zoo_app = typer.Typer(no_args_is_help=True, help="The tiny model zoo for tests, demos and benchmarks.")
app.add_typer(zoo_app, name="zoo")

console = Console()
err = Console(stderr=True)
def is_user_error(exc: Exception) -> bool:
    """An error a user causes that comes from below `orchestrator` (which cannot import `orchestrator.errors`):
    a ValueError (RecipeError, SourceError, TaskDataError), a missing file, or a MaterializeError. The last is
    looked up only where its module was loaded (otherwise `exc` is not one), so that light commands (status,
    cancel) never import torch."""
    materialize = sys.modules.get("workers.materialize")
    return isinstance(exc, (ValueError, FileNotFoundError)) or (
        materialize is not None and isinstance(exc, materialize.MaterializeError)
    )
F = TypeVar("F", bound=Callable[..., Any])

DbOption = Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL of the archive (default: SQLite under ~/.mergesearch).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ServerOption = Annotated[
    str | None,
    typer.Option("--server",
                 help="URL of a `mergesearch serve` (token from MERGESEARCH_TOKEN); default: the archive at --db."),
]
DEFAULT_ZOO = Path("~/.mergesearch/zoo").expanduser()


def user_errors(fn: F) -> F:
    """Turn the errors a user can see into one line on stderr and their kind's exit code (`errors.OUTCOMES`:
    2 for the user's, 3 for an unreachable database or server)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not (isinstance(exc, MergesearchError) or is_user_error(exc)):
                raise
            err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(outcome(exc)[1] if isinstance(exc, MergesearchError) else 2) from None

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


# -- zoo ----------------------------------------------------------------------------------------------------
@zoo_app.command("build")
@user_errors
def zoo_build(
    out: Annotated[Path, typer.Option(help="Folder to write the zoo to.")] = DEFAULT_ZOO,
    seed: Annotated[int, typer.Option(help="Training seed: same seed, same bytes.")] = 0,
    experts: Annotated[str, typer.Option(help="Comma-separated expert tasks.")] = "copy,reverse,add,sort",
    profile: Annotated[str, typer.Option(help="full (the reference zoo) or quick (for tests).")] = "full",
    json_out: JsonOption = False,
) -> None:
    """Train a tiny Llama base and task experts fine-tuned from it (cached: a second build is instant)."""
    from workers.zoo import build_zoo

    names = [e.strip() for e in experts.split(",") if e.strip()]
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err) as bar:
        task = bar.add_task("zoo", total=1.0)
        info = build_zoo(out, seed=seed, experts=names, profile=profile,
                         progress=lambda msg, frac: bar.update(task, description=msg, completed=frac))
    if json_out:
        print_json(info)
        return
    table = Table(title=f"zoo at {out} (dev / test exact match)")
    table.add_column("model")
    tasks = list(info["tasks"])
    for t in tasks:
        table.add_column(t, justify="right")
    for model, scores in info["scores"].items():
        table.add_row(model, *(f"{scores[t]['dev']:.2f} / {scores[t]['test']:.2f}" for t in tasks))
    console.print(table)
    console.print(f"job file: {out / 'job.yaml'}")


# -- run ----------------------------------------------------------------------------------------------------
def _override(spec: JobSpec, budget: int | None, strategy: str | None, workers: int | None) -> JobSpec:
    search: dict[str, Any] = {k: v for k, v in {"budget": budget, "strategy": strategy}.items() if v is not None}
    if strategy is not None and strategy != spec.search.strategy:
        search["params"] = {}  # another strategy's parameters do not apply: use its paper defaults
    return with_overrides(spec, search=search, workers={"count": workers} if workers is not None else {})


def execute(
    spec: JobSpec,
    archive: Archive,
    ray_address: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run a new job to the end on a local Ray or a cluster; returns the job report."""
    from orchestrator.dashboard.watch import run_progress
    from orchestrator.launch import ray_pool, run_job, run_settings

    settings = run_settings(spec)  # opens the models: checked before the job is created
    with ray_pool(spec, ray_address) as pool:
        job_id = archive.create_job(spec.to_json(), spec.name)
        with run_progress(archive, job_id, spec.workers.count, console=err, enabled=show_progress) as show:
            try:
                return run_job(archive, spec, job_id, pool, settings, on_progress=show,
                               should_stop=lambda: archive.job(job_id).status == JobStatus.CANCELLED)
            except BaseException as exc:
                archive.set_status(job_id, JobStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
                raise


def results_table(report: dict[str, Any], task_names: list[str]) -> Table:
    table = Table(title=f"job {report['job_id']}: {report['evaluations']} evaluations (dev / test)")
    table.add_column("model", no_wrap=True)
    for t in task_names:
        table.add_column(t, justify="right", no_wrap=True)
    table.add_column("mean", justify="right", no_wrap=True)

    def add(name: str, dev: dict[str, float] | None, test: dict[str, float] | None, style: str = "") -> None:
        dev, test = dev or {}, test or {}
        cells = [f"{dev.get(t, float('nan')):.2f}/{test.get(t, float('nan')):.2f}" for t in task_names]
        means = [f"{fitness(scores):.2f}" if scores else "nan" for scores in (dev, test)]
        table.add_row(name, *cells, "/".join(means), style=style)

    if report.get("ideal"):
        add("ideal", report["ideal"].get("dev"), report["ideal"].get("test"), "dim")
    for name, ref in report["references"].items():
        add(name, ref["dev"], ref["test"])
    if report["best"]:
        add(f"best (#{report['best']['id']})", report["best"]["dev"], report["best"]["test"], "bold green")
    return table


@app.command()
@user_errors
def run(
    job_file: Annotated[Path, typer.Argument(help="The job YAML.")],
    db: DbOption = None,
    out: Annotated[Path | None, typer.Option(help="Pull the best model to this folder at the end.")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster instead of starting a local Ray.")] = None,
    budget: Annotated[int | None, typer.Option(help="Override search.budget.")] = None,
    strategy: Annotated[str | None, typer.Option(help="Override search.strategy.")] = None,
    workers: Annotated[int | None, typer.Option(help="Override workers.count.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Validate a job, evaluate the references, search for the budget, and print the results."""
    spec = _override(load_job(job_file), budget, strategy, workers)
    archive = Archive(db)
    report = execute(spec, archive, ray_address=ray_address, show_progress=not json_out)
    if out is not None:
        from orchestrator.jobs import Jobs

        report["pulled"] = str(Jobs(archive).pull(report["job_id"], out))
    if json_out:
        print_json(report)
        return
    console.print(results_table(report, [t.name for t in spec.tasks]))
    if out is not None:
        console.print(f"best model written to {report['pulled']}")


@app.command()
@user_errors
def quickstart(
    zoo: Annotated[Path, typer.Option(help="Where the model zoo lives (built if missing).")] = DEFAULT_ZOO,
    out: Annotated[Path, typer.Option(help="Where the best merged model goes.")] = Path("mergesearch-best"),
    db: DbOption = None,
    budget: Annotated[int, typer.Option(help="Evaluations for the search.")] = 16,
) -> None:
    """Build the zoo (cached), search it on a local Ray with SQLite, print the table, pull the best model."""
    zoo_build(out=zoo, seed=0, experts="copy,reverse,add,sort", profile="full", json_out=False)
    run(zoo / "job.yaml", db=db, out=out, ray_address=None, budget=budget, strategy=None, workers=None,
        json_out=False)


# -- archive, pull ------------------------------------------------------------------------------------------
@app.command("archive")
@user_errors
def archive_cmd(
    job_id: Annotated[int, typer.Argument(help="The job.")],
    db: DbOption = None,
    server: ServerOption = None,
    top: Annotated[int, typer.Option(help="How many candidates, best first.")] = 20,
    json_out: JsonOption = False,
) -> None:
    """List a job's candidates, best first."""
    from orchestrator.service.client import jobs_client

    rows = jobs_client(server, db).candidates(job_id, kind=Kind.SEARCH, limit=top)["items"]
    if json_out:
        keys = ("id", "status", "fitness", "dev", "test", "recipe", "parents", "generation", "sparsity", "error")
        print_json([{k: c[k] for k in keys} for c in rows])
        return
    tasks = sorted({t for c in rows for t in (c["dev"] or {})})
    table = Table(title=f"job {job_id}: top {len(rows)} candidates")
    for col in ("id", "gen", "status", "fitness", *tasks, "ops"):
        table.add_column(col, justify="right" if col not in ("status", "ops") else "left")
    from workers.recipe import Recipe

    for c in rows:
        dev = c["dev"] or {}
        failed = c["status"] == CandidateStatus.FAILED
        ops = (c["error"] or "")[:60] if failed else Recipe.parse(c["recipe"]).summary()
        table.add_row(str(c["id"]), str(c["generation"]), c["status"],
                      f"{c['fitness']:.3f}" if c["fitness"] is not None else "–",
                      *(f"{dev[t]:.3f}" if t in dev else "–" for t in tasks), ops)
    console.print(table)


@app.command("pull")
@user_errors
def pull_cmd(
    job_id: Annotated[int, typer.Argument(help="The job.")],
    out: Annotated[Path, typer.Option(help="Folder to write the Hugging Face model to.")],
    candidate: Annotated[int | None, typer.Option(help="Candidate id (default: the best).")] = None,
    db: DbOption = None,
    server: ServerOption = None,
) -> None:
    """Re-materialize a candidate (the best by default) into a Hugging Face folder with its model card."""
    from orchestrator.service.client import jobs_client

    folder = jobs_client(server, db).pull(job_id, out, candidate)
    console.print(f"wrote {folder}")


def _load_commands() -> None:
    from orchestrator import commands

    for mod in pkgutil.iter_modules(commands.__path__):
        importlib.import_module(f"{commands.__name__}.{mod.name}")


_load_commands()
