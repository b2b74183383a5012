"""`mergesearch inspect`: sparsity anatomy of a model's task vector against its base (ALGORITHMS.md §3)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from orchestrator.cli import JsonOption, app, console, err, print_json, user_errors

COLUMNS = (
    ("l0", "L0"),
    ("zero_fraction", "zeros"),
    ("gini", "Gini"),
    ("kurtosis", "kurtosis"),
    ("top1_mass", "top 1%"),
    ("top5_mass", "top 5%"),
)


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def summary_table(title: str, label: str, rows: list[tuple[str, dict[str, Any]]]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column(label)
    table.add_column("tensors", justify="right")
    for _, header in COLUMNS:
        table.add_column(header, justify="right")
    for name, stats in rows:
        table.add_row(name, str(stats["tensors"]), *(_cell(stats[key]) for key, _ in COLUMNS))
    return table


@app.command("inspect")
@user_errors
def inspect_cmd(
    model: Annotated[Path, typer.Argument(help="The fine-tuned or merged model folder.")],
    base: Annotated[Path, typer.Option("--base", help="The base model folder it is compared with.")],
    json_out: JsonOption = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also write a layers × module heatmap PNG.")
    ] = None,
) -> None:
    """Sparsity of MODEL − BASE per module class and layer: L0, exact zeros, Gini, kurtosis, top-k mass."""
    from workers.anatomy import anatomy, plot_anatomy

    with Progress(
        TextColumn("reading"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err,
        transient=True,
        disable=json_out,
    ) as bar:
        task = bar.add_task("inspect", total=None)
        report = anatomy(
            model, base, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    if plot is not None:
        plot_anatomy(report, plot)
    if json_out:
        print_json(report)
        return
    modules = list(report["modules"].items()) + [("all, by numel", report["global"])]
    console.print(summary_table("by module class (mean over tensors)", "module", modules))
    layers = [(str(row["layer"]), row) for row in report["layers"]]
    console.print(summary_table("by decoder layer (mean over tensors)", "layer", layers))
    predicted = report["global"]["predicted_l0"]
    if predicted is not None:
        console.print(
            f"scaling-law L0 for {report['global']['numel'] / 1e9:.1f}B parameters: {predicted:.3f}"
        )
    if plot is not None:
        console.print(f"wrote {plot}")
