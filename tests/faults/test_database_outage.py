"""The database (a real PostgreSQL, stopped by pid) goes away in the middle of a job."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

from orchestrator.archive import Archive
from orchestrator.service.app import create_app
from orchestrator.service.settings import ServiceSettings
from tests.postgres import PostgresServer
from tests.service.fixtures import TOKEN, FakeCluster, job_yaml, wait_for

YAML = {"Content-Type": "application/yaml"}


def service(tmp_path: Path, data_root: Path, url: str, retries: int, cluster: FakeCluster) -> TestClient:
    settings = ServiceSettings(db=url, db_retries=retries, data_roots=[data_root], token=TOKEN,
                               state_dir=tmp_path / "state", rebalance_seconds=0.2)
    return TestClient(create_app(settings, cluster=cluster), headers={"Authorization": f"Bearer {TOKEN}"})


def test_a_brief_outage_is_ridden_out(tmp_path: Path, slow_root: Path, postgres: PostgresServer,
                                      postgres_url: str) -> None:
    cluster = FakeCluster(delay=0.05)
    with service(tmp_path, slow_root, postgres_url, retries=8, cluster=cluster) as client:
        job = client.post("/jobs", content=job_yaml(budget=30), headers=YAML).json()["id"]
        wait_for(lambda: client.get(f"/jobs/{job}").json()["done"] >= 3)
        postgres.stop()
        try:
            assert client.get("/health").status_code == 503
            time.sleep(1.0)
        finally:
            postgres.start()
        view = wait_for(lambda: (v := client.get(f"/jobs/{job}").json())["status"] in ("done", "failed") and v, timeout=60)
    assert view["status"] == "done" and view["done"] == 30 and view["failed"] == 0
    rows = Archive(postgres_url).candidates(job, kind="search")
    assert sorted(c.number for c in rows) == list(range(30)) and all(c.status == "done" for c in rows)


def test_a_long_outage_fails_the_job_clearly_and_resume_finishes_it(
    tmp_path: Path, slow_root: Path, postgres: PostgresServer, postgres_url: str
) -> None:
    cluster = FakeCluster(delay=0.05)
    with service(tmp_path, slow_root, postgres_url, retries=2, cluster=cluster) as client:
        job = client.post("/jobs", content=job_yaml(budget=30), headers=YAML).json()["id"]
        wait_for(lambda: client.get(f"/jobs/{job}").json()["done"] >= 3)
        postgres.stop()
        try:
            time.sleep(2.0)  # longer than 2 tries with backoff: the driver gives up
        finally:
            postgres.start()
        view = wait_for(lambda: (v := client.get(f"/jobs/{job}").json())["status"] == "failed" and v, timeout=60)
        assert "ArchiveError" in view["error"] and "unreachable" in view["error"]
        assert view["done"] < 30
        assert client.post(f"/jobs/{job}/resume").status_code == 200
        view = wait_for(lambda: (v := client.get(f"/jobs/{job}").json())["status"] == "done" and v, timeout=60)
    assert view["done"] == 30 and view["failed"] == 0
    rows = Archive(postgres_url).candidates(job, kind="search")
    assert len(rows) == 30 and sorted(c.number for c in rows) == list(range(30))
