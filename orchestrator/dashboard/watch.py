"""The live terminal view of a job: `mergesearch status JOB --watch` (full) and `mergesearch run` (compact).

Both draw one snapshot (`queries.snapshot`: the job's view, its fitness curve, top, running and failed
candidates) with rich. `status --watch` fetches it from a server (`--server`) or the archive (`--db`) each
second until the job ends; `run` builds it from the archive as its driver reports progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from orchestrator.archive import Archive
from orchestrator.dashboard.queries import snapshot
from orchestrator.records import ENDED, JobStatus

if TYPE_CHECKING:
    from orchestrator.driver import Progress
    from orchestrator.service.client import JobsClient

Snapshot = dict[str, Any]
SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None], width: int = 48) -> str:
    """The last `width` values as block characters, scaled between their min and max."""
    shown = [v for v in values if v is not None][-width:]
    if not shown:
        return ""
    low, high = min(shown), max(shown)
    span = high - low
    return "".join(SPARKS[round((v - low) / span * (len(SPARKS) - 1)) if span else 3] for v in shown)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def render(snap: Snapshot, compact: bool = False) -> RenderableType:
    """The job's panel (progress, best and median with sparklines, workers); unless `compact`, also its top
    candidates and recent failures."""
    job, curve = snap["job"], snap["curve"]
    evaluated = job["done"] + job["failed"]
    title = f"job {job['id']} · {job['name']} · {job['strategy']} · [bold]{job['status']}[/bold]"
    if job.get("phase") and job["status"] == JobStatus.RUNNING:
        title += f" ({job['phase']})"
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(no_wrap=True)
    progress = Table.grid(padding=(0, 1))
    progress.add_row(
        ProgressBar(total=max(job["budget"], 1), completed=evaluated, width=32),
        Text.assemble(
            f"{evaluated}/{job['budget']}", (f"  {job['failed']} failed", "red") if job["failed"] else ""
        ),
    )
    grid.add_row("evaluations", progress)
    timing = f"elapsed {duration(job.get('elapsed_s'))}"
    if job.get("eta_s") is not None:
        timing += f" · about {duration(job['eta_s'])} left"
    if job.get("queue_position"):
        timing += f" · position {job['queue_position']} in the queue"
    grid.add_row("time", timing)
    median = next((m for m in reversed(curve["median"]) if m is not None), None)
    grid.add_row(
        "best",
        Text.assemble((score(job["best_fitness"]).ljust(7), "green"), (sparkline(curve["best"]), "green")),
    )
    window = f" (last {curve['window']})" if curve["window"] > 1 else " (latest)"
    grid.add_row(
        "median",
        Text.assemble((score(median).ljust(7), "cyan"), (sparkline(curve["median"]), "cyan"), window),
    )
    grid.add_row(
        "workers", f"{job['running']} busy" + (f" of {job['workers']}" if job.get("workers") else "")
    )
    if job.get("error"):
        grid.add_row("error", Text(job["error"], style="red"))
    panel = Panel(grid, title=title, title_align="left", border_style="blue", expand=False)
    if compact:
        return panel
    parts: list[RenderableType] = [panel]
    if snap["top"]:
        tasks = sorted({t for c in snap["top"] for t in (c["dev"] or {})})
        top = Table(title="top candidates", title_justify="left", expand=False)
        for column in ("id", "gen", "fitness", *tasks, "sparsity"):
            top.add_column(column, justify="right")
        for c in snap["top"]:
            dev = c["dev"] or {}
            top.add_row(
                str(c["id"]),
                str(c["generation"]),
                score(c["fitness"]),
                *(score(dev.get(t)) for t in tasks),
                score(c["sparsity"]),
            )
        parts.append(top)
    if snap["running"]:
        parts.append(Text("running: " + ", ".join(f"#{c['id']}" for c in snap["running"]), style="dim"))
    if snap["failures"]:
        failures = Table(title="recent failures", title_justify="left", expand=False, title_style="red")
        failures.add_column("id", justify="right")
        failures.add_column("error", overflow="fold", max_width=100)
        for c in snap["failures"]:
            failures.add_row(str(c["id"]), c["error"] or "")
        parts.append(failures)
    return Group(*parts)


def follow(fetch: Callable[[], Snapshot], console: Console, interval: float = 1.0) -> Snapshot:
    """Redraw `fetch()` every `interval` seconds until the job ends (Ctrl-C stops watching, not the job)."""
    snap = fetch()
    with Live(render(snap), console=console, refresh_per_second=4, auto_refresh=False) as live:
        try:
            while snap["job"]["status"] not in ENDED:
                time.sleep(interval)
                snap = fetch()
                live.update(render(snap), refresh=True)
        except KeyboardInterrupt:
            pass
    return snap


def snapshot_source(client: JobsClient, job_id: int) -> Callable[[], Snapshot]:
    """Where snapshots come from: the server's dashboard API, or the archive the client reads."""
    from orchestrator.service.client import LocalJobs, RemoteJobs

    if isinstance(client, LocalJobs):
        return lambda: snapshot(client.archive, client.job(job_id))
    if isinstance(client, RemoteJobs):
        return lambda: client._call("GET", f"/dashboard/api/jobs/{job_id}/snapshot")
    raise TypeError(f"cannot watch through {type(client).__name__}")


def watch(
    client: JobsClient, job_id: int | None, console: Console | None = None, interval: float = 1.0
) -> Snapshot:
    """`mergesearch status JOB_ID --watch`."""
    if job_id is None:
        raise ValueError("--watch needs a JOB_ID")
    return follow(snapshot_source(client, job_id), console or Console(), interval)


@contextmanager
def run_progress(
    archive: Archive, job_id: int, workers: int, console: Console, enabled: bool = True, every: float = 0.5
) -> Iterator[Callable[[Progress], None]]:
    """For `run`: a driver `on_progress` callback redrawing the compact view at most every `every` seconds.

    Busy workers are the driver's work in flight, references included (the view counts search candidates).
    """
    from orchestrator.views import job_views

    def build(latest: Progress | None) -> Snapshot:
        phase, busy = (latest.phase, latest.inflight) if latest else ("starting", 0)
        view = job_views(archive, [archive.job(job_id)], [], {job_id: (workers, phase)})[0]
        view_json = {**view.model_dump(mode="json"), "running": busy}
        return snapshot(archive, view_json, top=0, failures=0, running=0)

    if not enabled:
        yield lambda _progress: None
        return
    drawn, latest = 0.0, None
    with Live(render(build(latest), compact=True), console=console, auto_refresh=False) as live:

        def show(progress: Progress) -> None:
            nonlocal drawn, latest
            latest = progress
            if time.monotonic() - drawn >= every:
                live.update(render(build(latest), compact=True), refresh=True)
                drawn = time.monotonic()

        try:
            yield show
        finally:
            live.update(render(build(latest), compact=True), refresh=True)
