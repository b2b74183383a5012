"""The driver loop against an in-process pool: budget, references, exactly-once after a crash, failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.archive import Archive
from orchestrator.driver import Driver, reference_recipes
from orchestrator.jobspec import JobSpec
from orchestrator.pool import LocalPool, Work
from workers.recipe import Recipe, canonical_hash

EXPERTS = ["a", "b", "c"]


def spec(budget: int = 12, strategy: str = "random", references: bool = True) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "t",
            "models": {"base": "/m/base", "experts": {e: f"/m/{e}" for e in EXPERTS}},
            "tasks": [{"name": "x", "path": "/t/x"}, {"name": "y", "path": "/t/y"}],
            "search": {"strategy": strategy, "budget": budget, "seed": 3},
            "workers": {"count": 4},
            "references": references,
        }
    )


def fake_eval(work: Work) -> dict[str, Any]:
    """A deterministic score from the recipe: how much weight layer 0 puts on expert 'a'."""
    Recipe.parse(work.recipe)
    params = work.recipe["layers"][0]["params"]
    w = params.get("weights", [1.0, 0.0, 0.0])
    x = w[0] / (sum(w) or 1.0)
    out: dict[str, Any] = {"ok": True, "dev": {"x": x, "y": 1 - x * x}, "per_example": {"x": [x], "y": [1 - x * x]},
                           "sparsity": 0.0, "timings": {"evaluate": 0.0}, "worker": "local"}
    if "test" in work.splits:
        out["test"] = dict(out["dev"])
    return out


def make(tmp_path: Path, s: JobSpec, fn=fake_eval) -> tuple[Archive, int, Driver]:
    archive = Archive(f"sqlite:///{tmp_path / 'a.db'}")
    job = archive.create_job(s.to_json(), s.name)
    return archive, job, Driver(archive, s, job, LocalPool(fn, s.workers.count), num_layers=4)


def test_runs_exactly_the_budget_and_reports(tmp_path: Path) -> None:
    archive, job, driver = make(tmp_path, spec())
    report = driver.run()
    assert report["evaluations"] == 12
    assert set(report["references"]) == {"expert:a", "expert:b", "expert:c", "uniform", "task_arithmetic", "ties"}
    best = archive.best(job)
    assert report["best"]["fitness"] == pytest.approx(best.fitness)
    assert best.test is not None and best.info["dev_full"] is not None
    numbers = [c.number for c in archive.candidates(job, kind="search")]
    assert sorted(numbers) == list(range(12))
    assert archive.job(job).status == "done"


def test_ideal_is_the_per_task_best_expert(tmp_path: Path) -> None:
    _, _, driver = make(tmp_path, spec(budget=4))
    report = driver.run()
    experts = {k: v for k, v in report["references"].items() if k.startswith("expert:")}
    for task in ("x", "y"):
        assert report["ideal"]["test"][task] == max(r["test"][task] for r in experts.values())


class Crash(Exception):
    pass


def test_resume_after_crash_loses_and_repeats_nothing(tmp_path: Path) -> None:
    calls = {"n": 0}

    def crashing(work: Work) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 9:
            raise Crash()
        return fake_eval(work)

    s = spec(budget=12, references=False)
    archive, job, driver = make(tmp_path, s, crashing)
    with pytest.raises(Crash):
        driver.run()
    interrupted = archive.counts(job)
    assert 0 < interrupted.get("done", 0) < 12
    # A fresh driver (as after a restart) resumes from the archive and its checkpoint.
    resumed = Driver(archive, s, job, LocalPool(fake_eval, 4), num_layers=4).run()
    assert resumed["evaluations"] == 12
    rows = archive.candidates(job, kind="search")
    assert len(rows) == 12 and all(c.status == "done" for c in rows)
    assert sorted(c.number for c in rows) == list(range(12))
    assert len({c.recipe_hash for c in rows}) == 12


def test_failed_candidates_are_recorded_and_the_search_goes_on(tmp_path: Path) -> None:
    def sometimes_nan(work: Work) -> dict[str, Any]:
        if work.cand_id % 3 == 0:
            return {"ok": False, "kind": "nan_output", "error": "nan_output: tensor model.layers.0.mlp has NaN"}
        return fake_eval(work)

    archive, job, driver = make(tmp_path, spec(budget=9, references=False), sometimes_nan)
    report = driver.run()
    failed = archive.candidates(job, kind="search", status="failed")
    assert report["evaluations"] == 9 and report["failed"] == len(failed) > 0
    assert all("NaN" in c.error for c in failed)


def test_lost_worker_is_retried_then_failed(tmp_path: Path) -> None:
    from orchestrator.pool import Completion

    class FlakyPool(LocalPool):
        def wait(self, timeout: float | None = None) -> list[Completion]:
            done = []
            for w in self.queue:
                lost = w.cand_id == 1  # this candidate always loses its worker
                done.append(Completion(w, lost="RayActorError") if lost else Completion(w, output=self.fn(w)))
            self.queue = []
            return done

    s = spec(budget=5, references=False)
    archive = Archive(f"sqlite:///{tmp_path / 'a.db'}")
    job = archive.create_job(s.to_json(), s.name)
    Driver(archive, s, job, FlakyPool(fake_eval, 4), num_layers=4).run()
    cand = archive.candidate(1)
    assert cand.status == "failed" and cand.attempts == s.workers.max_attempts
    assert archive.counts(job) == {"done": 4, "failed": 1}


def test_reference_recipes_are_valid_and_distinct() -> None:
    from workers.operators import check_recipe

    refs = reference_recipes(EXPERTS, num_layers=4)
    hashes = set()
    for recipe in refs.values():
        parsed = Recipe.parse(recipe)
        check_recipe(parsed, n_source_layers=4)
        hashes.add(canonical_hash(recipe))
    assert len(hashes) == len(refs)


def test_a_pool_shrunk_while_the_driver_dispatches_finishes_the_job(tmp_path: Path) -> None:
    """The scheduler resizes pools from its own thread; one landing between the driver's reading the pool's size
    and its submits (here: while the archive marks the batch started) must not fail the job."""
    archive, job, driver = make(tmp_path, spec(budget=8, references=False))
    start_many = archive.start_many
    sizes: list[int] = []

    def start_and_shrink(ids: list[int], worker: str) -> None:
        start_many(ids, worker)
        sizes.append(driver.pool.size)
        driver.pool.resize(2)

    archive.start_many = start_and_shrink  # type: ignore[method-assign]
    report = driver.run()
    assert report["evaluations"] == 8 and archive.job(job).status == "done"
    assert sizes[0] == 4 and sizes[-1] == 2  # the shrink took effect at the next wait, not mid-dispatch
