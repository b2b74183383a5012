"""The service on PostgreSQL, stopped mid-job by SIGTERM (it drains: drivers stop, its local Ray stops, the job
stays resumable) and then killed by SIGKILL (a crash): after each restart the job goes on, and in the end every
candidate was asked once and finished once, and what had finished before a stop was kept, not redone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from orchestrator.archive import Archive
from tests.cluster.processes import Process, get, serve, wait_healthy
from tests.postgres import free_port
from tests.service.fixtures import TOKEN, job_yaml, wait_for

BUDGET = 10


def finished(archive: Archive, job: int) -> dict[int, tuple[float | None, object]]:
    return {c.id: (c.fitness, c.finished_at) for c in archive.candidates(job, status="done")}


def test_sigterm_drains_and_sigkill_loses_nothing_on_postgres(
    tmp_path: Path, slow_root: Path, postgres_url: str
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    services = [serve(tmp_path, port, postgres_url, TOKEN, slow_root, log=f"service-{i}") for i in range(3)]
    archive = Archive(postgres_url)
    try:
        first, second, third = services
        first.start()
        wait_healthy(url, first)
        r = httpx.post(f"{url}/jobs", content=job_yaml(budget=BUDGET, workers=2, slow=True), timeout=120,
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/yaml"})
        assert r.status_code == 201, r.text
        job = r.json()["id"]
        wait_for(lambda: get(url, TOKEN, f"/jobs/{job}")["done"] >= 2, timeout=240, every=0.2)

        assert stop_gracefully(first), first.tail()
        assert "SIGTERM received" not in first.tail(20000)  # Ray's crash handler did not take the signal
        assert first.session() == [], "the service's local Ray outlived it"
        assert "service stopped: the job resumes at its next start" in [e.message for e in archive.events(job)]
        assert archive.job(job).status == "running"  # interrupted, not failed or cancelled: it resumes
        after_term = finished(archive, job)
        assert 2 <= len(after_term) < BUDGET

        second.start()
        wait_healthy(url, second)
        wait_for(lambda: get(url, TOKEN, f"/jobs/{job}")["done"] >= len(after_term) + 2, timeout=240, every=0.2)
        second.kill()
        after_kill = finished(archive, job)
        assert len(after_kill) < BUDGET, "the job ended before the crash; nothing was tested"

        third.start()
        wait_healthy(url, third)
        view = wait_for(lambda: (v := get(url, TOKEN, f"/jobs/{job}"))["status"] == "done" and v, timeout=300)
    finally:
        for service in services:
            service.kill()
    assert view["done"] == BUDGET and view["failed"] == 0
    rows = archive.candidates(job, kind="search")
    assert sorted(c.number for c in rows) == list(range(BUDGET))  # asked once each
    assert len({c.recipe_hash for c in rows}) == BUDGET
    final = finished(archive, job)
    assert all(final[i] == after_term[i] for i in after_term)  # finished before a stop: kept, not redone
    assert all(final[i] == after_kill[i] for i in after_kill)
    messages = [e.message for e in archive.events(job, limit=1000)]
    assert messages.count("service started: resuming from the archive") == 2


def stop_gracefully(service: Process, grace: float = 90.0) -> bool:
    """SIGTERM; whether it exited within `grace` seconds (uvicorn re-raises the signal once it has shut down,
    so the exit status is -15 either way: the job's log tells a drain from a crash)."""
    assert service.proc is not None
    service.proc.terminate()
    try:
        service.proc.wait(grace)
    except subprocess.TimeoutExpired:
        service.kill()
        return False
    return True
