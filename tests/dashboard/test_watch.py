"""The live terminal view: its drawing, `status --watch` with `--db` and with `--server`, and `run`'s view."""

from __future__ import annotations

import re
import threading
from typing import Any

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from orchestrator.archive import Archive
from orchestrator.cli import app
from orchestrator.dashboard.watch import render, run_progress, sparkline
from orchestrator.driver import Progress
from orchestrator.service.app import create_app
from orchestrator.service.settings import ServiceSettings
from tests.dashboard.live import serving
from tests.service.fixtures import TOKEN, FakeCluster, job_yaml, wait_for

runner = CliRunner()


def test_sparkline_scales_between_min_and_max_and_keeps_the_latest() -> None:
    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert sparkline([None, 2.0, 2.0]) == "▄▄"
    assert sparkline(list(range(100)), width=4) == "▁▃▆█"
    assert sparkline([]) == ""


def snap(**job: Any) -> dict[str, Any]:
    view = {
        "id": 3,
        "name": "zoo",
        "strategy": "sae",
        "status": "running",
        "phase": "search",
        "budget": 40,
        "done": 12,
        "failed": 2,
        "running": 2,
        "workers": 2,
        "best_fitness": 0.8125,
        "queue_position": None,
        "error": None,
        "elapsed_s": 75.0,
        "eta_s": 130.0,
        **job,
    }
    top = [
        {"id": 17, "generation": 2, "fitness": 0.8125, "dev": {"copy": 0.9, "add": 0.725}, "sparsity": 0.35}
    ]
    failures = [{"id": 21, "error": "nan_output: layer 3 produced NaN"}]
    curve = {"n": [5, 10, 14], "best": [0.5, 0.7, 0.8125], "median": [0.3, 0.4, 0.55], "window": 5}
    return {
        "job": view,
        "curve": curve,
        "top": top,
        "running": [{"id": 22}, {"id": 23}],
        "failures": failures,
    }


def rendered(renderable: Any) -> str:
    console = Console(record=True, width=120, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_the_full_view_shows_progress_curves_top_candidates_workers_and_failures() -> None:
    text = rendered(render(snap()))
    assert "job 3 · zoo · sae · running (search)" in text
    assert "14/40" in text and "2 failed" in text
    assert "elapsed 1:15 · about 2:10 left" in text
    assert re.search(r"best\s+0\.812\s+▁▅█", text) and re.search(r"median\s+0\.550\s+▁▄█ \(last 5\)", text)
    assert "2 busy of 2" in text and "running: #22, #23" in text
    assert re.search(r"17\s+│\s+2\s+│\s+0\.812\s+│\s+0\.725\s+│\s+0\.900\s+│\s+0\.350", text)
    assert "nan_output: layer 3 produced NaN" in text


def test_the_compact_view_leaves_out_the_tables() -> None:
    text = rendered(render(snap(status="queued", queue_position=2, eta_s=None), compact=True))
    assert "position 2 in the queue" in text and "about" not in text
    assert "top candidates" not in text and "nan_output" not in text


@pytest.fixture()
def service(settings: ServiceSettings) -> Any:
    cluster = FakeCluster(cpus=2, delay=0.05)
    with serving(create_app(settings, cluster=cluster)) as url:
        yield url, cluster


def test_watch_through_the_server_follows_a_job_until_it_ends(service: Any) -> None:
    url, cluster = service
    cluster.gate.clear()  # the job waits in its first evaluations until the watcher is attached
    job_id = submit(url, budget=12)
    threading.Timer(1.5, cluster.gate.set).start()
    code, out, err = invoke("status", job_id, "--watch", server=url)
    assert code == 0, err
    assert "12/12" in out and re.search(r"job \d+ · job · random · done", out)
    assert re.search(r"best\s+0\.\d{3}", out) and "top candidates" in out


def test_watch_on_the_archive_needs_a_job_and_shows_a_finished_one(
    service: Any, settings: ServiceSettings
) -> None:
    url, _ = service
    job_id = submit(url, budget=3)
    archive = Archive(settings.db)
    wait_for(lambda: archive.job(int(job_id)).status == "done")
    code, out, err = invoke("status", job_id, "--watch", "--db", settings.db)
    assert code == 0, err
    assert "3/3" in out and "done" in out
    code, _, err = invoke("status", "--watch", "--db", settings.db)
    assert code == 2 and "--watch needs a JOB_ID" in err


def submit(url: str, **job: Any) -> str:
    r = httpx.post(f"{url}/jobs", content=job_yaml(**job), headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def invoke(*args: str, server: str | None = None) -> tuple[int, str, str]:
    extra = ["--server", server] if server else []
    result = runner.invoke(app, [*args, *extra], env={"MERGESEARCH_TOKEN": TOKEN, "COLUMNS": "120"})
    return result.exit_code, result.stdout, result.stderr


def test_run_redraws_the_compact_view_from_the_archive(tmp_path: Any) -> None:
    archive = Archive(f"sqlite:///{tmp_path / 'a.db'}")
    job_id = archive.create_job({"search": {"budget": 4}}, "local", status="running")
    archive.set_status(job_id, "running")
    ids = archive.add_candidates(
        job_id, [{"kind": "search", "number": i, "recipe": {}, "recipe_hash": str(i)} for i in range(4)]
    )
    console = Console(record=True, width=120, color_system=None)
    with run_progress(archive, job_id, workers=2, console=console, every=0.0) as show:
        for i, cid in enumerate(ids[:3]):
            archive.finish(cid, {"status": "done", "fitness": 0.25 * (i + 1), "dev": {"t": 0.25 * (i + 1)}})
            show(Progress(job_id, i + 1, 0, 4, 1, 0.25 * (i + 1), "search"))
    text = console.export_text()
    assert "3/4" in text and re.search(r"best\s+0\.750", text) and "(search)" in text
    assert "1 busy of 2" in text  # the driver's work in flight
    assert "top candidates" not in text
