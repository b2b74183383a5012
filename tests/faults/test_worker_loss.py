"""A worker process killed (SIGKILL, by pid) in the middle of an evaluation, on a real local Ray."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import ray

from orchestrator.archive import Archive
from orchestrator.driver import Driver
from orchestrator.jobspec import parse_job
from orchestrator.launch import run_settings
from orchestrator.pool import RayPool, RayRuntime, worker_setup
from tests.service.fixtures import job_data, wait_for


def actor_pid(actor: Any) -> int:
    """The actor's process id, waiting for it to be up (a restarting actor answers when it is back)."""
    return int(ray.get(actor.ping.options(max_task_retries=-1).remote(), timeout=120).rsplit(":", 1)[1])


def test_killed_worker_is_replaced_and_its_candidate_retried(tmp_path: Path, slow_root: Path) -> None:
    spec = parse_job(job_data(budget=6, workers=2, slow=True), slow_root)
    archive = Archive(f"sqlite:///{tmp_path / 'archive.db'}")
    job = archive.create_job(spec.to_json(), spec.name)
    reports: list[dict[str, Any]] = []
    with RayRuntime(num_cpus=2):
        pool = RayPool(worker_setup(spec), 2, num_cpus=1)
        first_pids = [actor_pid(s.actor) for s in pool.slots]
        driver = Driver(archive, spec, job, pool, run_settings(spec, num_layers=2))
        thread = threading.Thread(target=lambda: reports.append(driver.run()), daemon=True)
        thread.start()
        wait_for(lambda: archive.counts(job).get("done", 0) >= 1, timeout=120)
        victim = wait_for(lambda: next((s for s in pool.slots if s.work is not None), None))
        victim_work = victim.work
        os.kill(first_pids[pool.slots.index(victim)], signal.SIGKILL)
        thread.join(180)
        assert not thread.is_alive(), "the job did not finish after its worker was killed"
        replacement = actor_pid(victim.actor)
        pool.close()

    assert reports[0]["evaluations"] == 6 and archive.counts(job) == {"done": 6}
    retried = archive.candidate(victim_work.cand_id)
    assert retried.status == "done" and retried.attempts == 2
    assert any("worker lost" in e.message for e in archive.events(job))
    rows = archive.candidates(job, kind="search")
    assert sorted(c.number for c in rows) == list(range(6))
    assert len({c.recipe_hash for c in rows}) == 6
    assert replacement not in first_pids  # Ray restarted the actor in a new process
    assert sum(c.attempts for c in rows) == 7  # one retry, nothing else evaluated twice
