"""A real three-node Ray cluster on this machine (a head and two worker nodes, each its own `ray start`), the
service on the head, and one worker node killed (its whole process group, by pid) in the middle of a job."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from orchestrator.archive import Archive, now
from tests.cluster.processes import Process, get, ray_node, serve, short_tempdir, wait_for_nodes, wait_healthy
from tests.postgres import free_port
from tests.service.fixtures import TOKEN, job_yaml, wait_for

BUDGET = 10


def pid(worker: str) -> int:
    return int(worker.rsplit(":", 1)[1])


def node_of(worker: str, nodes: list[Process]) -> Process | None:
    """The node whose session holds the live worker process `host:pid` (each node runs in its own session)."""
    try:
        sid = os.getsid(pid(worker))
    except ProcessLookupError:
        return None
    return next((n for n in nodes if n.pid == sid), None)


@pytest.mark.slow  # about 2 minutes on two busy cores: three Ray nodes, the service and its workers start up
def test_losing_a_worker_node_loses_no_candidate(tmp_path: Path, slow_root: Path) -> None:
    with short_tempdir() as ray_tmp:
        head_port = free_port()
        address = f"127.0.0.1:{head_port}"
        head = ray_node(ray_tmp, "head", num_cpus=0, port=head_port)
        workers = [ray_node(ray_tmp, f"worker{i}", head_address=address, num_cpus=2) for i in range(2)]
        db = f"sqlite:///{tmp_path / 'archive.db'}"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        service = serve(tmp_path, port, db, TOKEN, slow_root, "--ray-address", address)
        try:
            head.start()
            wait_for_nodes(address, 1, [head])
            for i, w in enumerate(workers):  # one at a time: two joining at once can time out on a busy machine
                w.start()
                wait_for_nodes(address, 2 + i, [head, *workers[: i + 1]])
            service.start()
            wait_healthy(url, service)
            r = httpx.post(f"{url}/jobs", content=job_yaml(budget=BUDGET, workers=2, slow=True),
                           headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/yaml"})
            assert r.status_code == 201, r.text
            job = r.json()["id"]
            archive = Archive(db)
            first = wait_for(lambda: archive.candidates(job, status="done", limit=1), timeout=240, every=0.2)[0]
            victim = node_of(first.worker, workers)
            assert victim is not None, f"worker {first.worker} is on no worker node"
            survivor = next(w for w in workers if w is not victim)
            victim.kill()
            killed_at = now()
            assert archive.counts(job).get("done", 0) < BUDGET
            on_survivor: set[int] = set()  # its processes, seen while the job runs (they end with the job)

            def ended() -> dict | None:
                on_survivor.update(survivor.session())
                view = get(url, TOKEN, f"/jobs/{job}")
                return view if view["status"] in ("done", "failed") else None

            view = wait_for(ended, timeout=300, every=0.5)
            late = [c for c in archive.candidates(job, status="done") if c.finished_at > killed_at]
            # The survivor took over (a result the victim returned just before it died may still land after).
            assert sum(pid(c.worker) in on_survivor for c in late) >= len(late) - 2
        finally:
            service.stop()
            for node in [*workers, head]:
                node.kill()

    assert view["status"] == "done", view
    assert view["done"] == BUDGET and view["failed"] == 0
    rows = archive.candidates(job, kind="search")
    assert len(rows) == BUDGET and sorted(c.number for c in rows) == list(range(BUDGET))
    assert len({c.recipe_hash for c in rows}) == BUDGET
    assert any(c.attempts >= 2 for c in rows), "no candidate was retried: the kill hit no evaluation"
    assert any("worker lost" in e.message for e in archive.events(job, limit=1000))

