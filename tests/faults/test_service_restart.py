"""The service killed (SIGKILL, by pid) in the middle of a job and started again: it resumes from the archive."""

from __future__ import annotations

from pathlib import Path

import httpx

from orchestrator.archive import Archive
from tests.cluster.processes import get, ray_node, serve, short_tempdir, wait_for_nodes, wait_healthy
from tests.postgres import free_port
from tests.service.fixtures import TOKEN, job_yaml, wait_for


def test_killed_service_resumes_every_unfinished_job(tmp_path: Path, slow_root: Path) -> None:
    with short_tempdir() as ray_tmp:
        run(tmp_path, ray_tmp, slow_root)


def run(tmp_path: Path, ray_tmp: Path, slow_root: Path) -> None:
    head_port = free_port()
    head = ray_node(ray_tmp, "head", num_cpus=2, port=head_port)
    address = f"127.0.0.1:{head_port}"
    db = f"sqlite:///{tmp_path / 'archive.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = serve(tmp_path, port, db, TOKEN, slow_root, "--ray-address", address, log="first")
    second = serve(tmp_path, port, db, TOKEN, slow_root, "--ray-address", address, log="second")
    try:
        head.start()
        wait_for_nodes(address, 1, [head])
        first.start()
        wait_healthy(url, first)
        r = httpx.post(f"{url}/jobs", content=job_yaml(budget=8, workers=2, slow=True),
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/yaml"})
        assert r.status_code == 201, r.text
        job = r.json()["id"]
        wait_for(lambda: get(url, TOKEN, f"/jobs/{job}")["done"] >= 3, timeout=180, every=0.2)
        first.kill()

        archive = Archive(db)
        assert archive.job(job).status == "running"  # nothing recorded the crash: the archive says where it was
        before = {c.id: (c.fitness, c.finished_at) for c in archive.candidates(job, status="done")}
        assert 3 <= len(before) < 8

        second.start()
        wait_healthy(url, second)
        view = wait_for(lambda: (v := get(url, TOKEN, f"/jobs/{job}"))["status"] == "done" and v, timeout=240)
    finally:
        first.kill()
        second.stop()
        head.kill()
    assert view["done"] == 8 and view["failed"] == 0
    rows = archive.candidates(job, kind="search")
    assert len(rows) == 8 and sorted(c.number for c in rows) == list(range(8))
    assert len({c.recipe_hash for c in rows}) == 8
    after = {c.id: (c.fitness, c.finished_at) for c in rows}
    assert all(after[i] == before[i] for i in before)  # finished work was kept, not redone
    assert any("resuming from the archive" in e.message for e in archive.events(job))
