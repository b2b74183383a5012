"""`mergesearch compare`: several strategies on one problem at one budget, over several seeds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.archive import Archive
from orchestrator.cli import DbOption, JsonOption, app, console, err, print_json, user_errors
from orchestrator.jobspec import load_job


@app.command()
@user_errors
def compare(
    job_file: Annotated[Path, typer.Argument(help="The job YAML (its strategy and budget are overridden).")],
    strategies: Annotated[str, typer.Option(help="Comma-separated strategies.")] = "random,cmaes,pso,sae",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per strategy.")] = 3,
    budget: Annotated[int, typer.Option(min=1, help="Evaluations per run.")] = 64,
    ceiling: Annotated[float | None, typer.Option(
        min=0, help="The zoo's merge ceiling (test mean, `python -m tests.bench.ceiling`): report fractions of it."
    )] = None,
    out: Annotated[Path, typer.Option(help="Folder for compare.json, compare.md and compare.png.")] = Path("compare"),
    db: DbOption = None,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Run each strategy on the same problem and budget; write a table and a best-so-far plot."""
    import search.strategies  # noqa: F401  (registers the strategies)
    from orchestrator.compare import plot_curves, run_comparison, summarize
    from orchestrator.launch import open_sources, ray_pool
    from search.base import STRATEGIES

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"--strategies: unknown strategy '{unknown[0]}' (known: {', '.join(sorted(STRATEGIES))})")
    spec = load_job(job_file)
    archive = Archive(db)
    total = len(names) * seeds * budget
    open_sources(spec)  # checks the models before Ray starts
    with ray_pool(spec, ray_address) as pool, Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, disable=json_out,
    ) as bar:
        task = bar.add_task("compare", total=total)
        finished: dict[str, int] = {}

        def show(label: str, p: Any) -> None:
            finished[label] = p.done + p.failed
            bar.update(task, completed=sum(finished.values()), description=f"{label} ({p.phase})")

        result = run_comparison(spec, archive, pool, names, seeds, budget, on_progress=show)
    tasks = [t.name for t in spec.tasks]
    rows = summarize(result, tasks, ceiling)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_curves(result, out / "compare.png")
    (out / "compare.json").write_text(json.dumps({"summary": rows, **result}, indent=1, default=str))
    (out / "compare.md").write_text(markdown_table(rows, result, tasks))
    if json_out:
        print_json({"summary": rows, "plot": str(plot)})
        return
    table = Table(title=f"budget {budget}, {seeds} seeds: held-out test of each run's best (mean ± sd)")
    for col in ("strategy", *tasks, "test mean", "per seed", "of ceiling", "dev mean", "evals to beat static"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for r in rows:
        table.add_row(r["strategy"], *(f"{r['per_task_test'][t]:.3f}" for t in tasks),
                      f"{r['test_mean']:.3f} ± {r['test_sd']:.3f}", _seeds(r), _fraction(r), f"{r['dev_mean']:.3f}",
                      ", ".join("–" if b is None else str(b) for b in r["evals_to_beat_static"]))
    console.print(table)
    console.print(f"wrote {out / 'compare.md'}, {plot}")


def markdown_table(rows: list[dict[str, Any]], result: dict[str, Any], tasks: list[str]) -> str:
    """The README's comparison table: strategies, then the references and the ideal for scale."""
    head = "| model | " + " | ".join(tasks) + " | test mean | per seed | of ceiling | evals to beat best static |\n"
    head += "|---" * (len(tasks) + 5) + "|\n"
    lines = []
    for r in rows:
        beat = ", ".join("–" if b is None else str(b) for b in r["evals_to_beat_static"])
        cells = " | ".join(f"{r['per_task_test'][t]:.3f}" for t in tasks)
        mean = f"{r['test_mean']:.3f} ± {r['test_sd']:.3f}"
        lines.append(f"| {r['strategy']} (best of run) | {cells} | {mean} | {_seeds(r)} | {_fraction(r)} | {beat} |")
    for name, ref in result["references"].items():
        test = ref["test"] or {}
        cells = " | ".join(f"{test.get(t, 0):.3f}" for t in tasks)
        lines.append(f"| {name} | {cells} | {sum(test.values()) / max(len(test), 1):.3f} | | | |")
    ideal = result["ideal"]["test"]
    cells = " | ".join(f"{ideal[t]:.3f}" for t in tasks)
    lines.append(f"| ideal | {cells} | {sum(ideal.values()) / len(ideal):.3f} | | | |")
    return head + "\n".join(lines) + "\n"


def _seeds(row: dict[str, Any]) -> str:
    return ", ".join(f"{t:.3f}" for t in row["test_means"])


def _fraction(row: dict[str, Any]) -> str:
    return "" if row["fraction_of_ceiling"] is None else f"{row['fraction_of_ceiling']:.3f}"
