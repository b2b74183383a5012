"""The scheduler shrinks and grows a running job's pool (fair sharing); on a real local Ray no evaluation is cut
short and the job still runs exactly its budget."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from orchestrator.archive import Archive
from orchestrator.driver import Driver
from orchestrator.jobspec import parse_job
from orchestrator.launch import run_settings
from orchestrator.pool import RayPool, RayRuntime, worker_setup
from tests.service.fixtures import job_data, wait_for


def test_a_ray_pool_shrinks_and_grows_under_a_running_job(tmp_path: Path, slow_root: Path) -> None:
    spec = parse_job(job_data(budget=10, workers=2, slow=True, references=False), slow_root)
    archive = Archive(f"sqlite:///{tmp_path / 'archive.db'}")
    job = archive.create_job(spec.to_json(), spec.name)
    reports: list[dict[str, Any]] = []
    with RayRuntime(num_cpus=3):
        pool = RayPool(worker_setup(spec), 2, num_cpus=1)
        driver = Driver(archive, spec, job, pool, run_settings(spec, num_layers=2))
        thread = threading.Thread(target=lambda: reports.append(driver.run()), daemon=True)
        thread.start()
        wait_for(lambda: archive.counts(job).get("done", 0) >= 1, timeout=120)
        pool.resize(1)  # from this thread, as the scheduler does
        wait_for(lambda: len(pool.slots) == 1, timeout=120)  # the surplus actor went once it was idle
        shrunk_to = pool.size
        pool.resize(3)
        wait_for(lambda: len(pool.slots) == 3, timeout=120)
        thread.join(300)
        assert not thread.is_alive(), "the job did not finish after its pool was resized"
        grown_to = pool.size
        pool.close()

    assert shrunk_to == 1 and grown_to == 3
    assert reports[0]["evaluations"] == 10 and archive.counts(job) == {"done": 10}
    rows = archive.candidates(job, kind="search")
    assert sum(c.attempts for c in rows) == 10  # nothing was cut short and evaluated again
    assert len({c.worker for c in rows}) >= 3  # the two first actors and at least one that came with the growth
