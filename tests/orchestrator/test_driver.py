"""The driver loop against an in-process pool: budget, references, exactly-once after a crash, failures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.archive import Archive
from orchestrator.driver import Driver, reference_recipes
from orchestrator.jobspec import JobSpec, ObjectiveSpec
from orchestrator.launch import run_settings
from orchestrator.pool import LocalPool, Work
from workers.recipe import FORMAT, Recipe, canonical_hash

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
    pool = LocalPool(fn, s.workers.count)
    return archive, job, Driver(archive, s, job, pool, run_settings(s, num_layers=4))


def test_runs_exactly_the_budget_and_reports(tmp_path: Path) -> None:
    archive, job, driver = make(tmp_path, spec())
    report = driver.run()
    assert report["evaluations"] == 12
    assert set(report["references"]) == {"base", "expert:a", "expert:b", "expert:c", "uniform", "task_arithmetic", "ties"}
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


def crashing_at(call: int) -> Callable[[Work], dict[str, Any]]:
    """`fake_eval` that crashes the process (as a killed driver) on its `call`-th call."""
    calls = {"n": 0}

    def crashing(work: Work) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == call:
            raise Crash()
        return fake_eval(work)

    return crashing


def test_resume_after_crash_loses_and_repeats_nothing(tmp_path: Path) -> None:
    s = spec(budget=12, references=False)
    archive, job, driver = make(tmp_path, s, crashing_at(9))
    with pytest.raises(Crash):
        driver.run()
    interrupted = archive.counts(job)
    assert 0 < interrupted.get("done", 0) < 12
    # A fresh driver (as after a restart) resumes from the archive and its checkpoint.
    resumed = Driver(archive, s, job, LocalPool(fake_eval, 4), run_settings(s, num_layers=4)).run()
    assert resumed["evaluations"] == 12
    rows = archive.candidates(job, kind="search")
    assert len(rows) == 12 and all(c.status == "done" for c in rows)
    assert sorted(c.number for c in rows) == list(range(12))
    assert len({c.recipe_hash for c in rows}) == 12


def test_a_resumed_job_keeps_the_recipe_format_it_started_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The format fixes DARE's masks (PSO's basis): a job begun by an older version, whose recipes are /1,
    goes on making /1 recipes after an upgrade, while a new job makes today's."""
    monkeypatch.setattr("orchestrator.driver.FORMAT", "mergesearch.recipe/1")  # the older version
    s = spec(budget=10, strategy="pso", references=False)
    archive, job, driver = make(tmp_path, s, crashing_at(5))
    with pytest.raises(Crash):
        driver.run()
    monkeypatch.undo()  # upgraded
    Driver(archive, s, job, LocalPool(fake_eval, 4), run_settings(s, num_layers=4)).run()
    formats = [c.recipe["format"] for c in archive.candidates(job, kind="search")]
    assert len(formats) == 10 and set(formats) == {"mergesearch.recipe/1"}
    fresh = archive.create_job(s.to_json(), s.name)
    Driver(archive, s, fresh, LocalPool(fake_eval, 4), run_settings(s, num_layers=4)).run()
    assert {c.recipe["format"] for c in archive.candidates(fresh, kind="search")} == {FORMAT}


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
    Driver(archive, s, job, FlakyPool(fake_eval, 4), run_settings(s, num_layers=4)).run()
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


def chunk_lucky_eval(work: Work) -> dict[str, Any]:
    """Search candidates score x = their share of expert 'a' on a dev chunk but only 0.3·x on the whole split;
    the uniform reference scores 0.5 on a chunk and 0.6 on the whole split: a chunk maximum picks the wrong one."""
    layer = work.recipe["layers"][0]
    w = layer["params"].get("weights", [0.0, 0.0, 0.0])
    x = 0.55 if layer["op"] == "linear" else w[0] / (sum(w) or 1.0)
    whole = 0.6 if layer["op"] == "linear" else 0.3 * x
    score = whole if work.subset == -1 else x
    out: dict[str, Any] = {"ok": True, "dev": {"x": score, "y": score}, "per_example": {"x": [score]},
                           "sparsity": 0.0, "timings": {"evaluate": 0.0}, "worker": "local"}
    if "test" in work.splits:
        out["test"] = {"x": whole, "y": whole}
    return out


def test_final_choice_promotes_finalists_and_may_pick_a_reference(tmp_path: Path) -> None:
    s = spec(budget=12)
    archive, job, driver = make(tmp_path, s, chunk_lucky_eval)
    report = driver.run()
    search = archive.candidates(job, kind="search", status="done")
    lucky = max(search, key=lambda c: c.fitness)
    assert lucky.fitness > 0.55  # the chunk maximum is a search candidate...
    finals = archive.candidates(job, kind="final")
    assert len(finals) <= s.search.promote + 1 and all(c.status == "done" and c.subset == -1 for c in finals)
    assert lucky.id in {c.info["source"] for c in finals}  # ...which was promoted and re-scored on all of dev,
    best = archive.best(job)
    assert best.kind == "final" and best.name == "uniform" and best.fitness == pytest.approx(0.6)  # and lost.
    assert report["best"]["test"] == {"x": 0.6, "y": 0.6} and report["best"]["dev_full"] == {"x": 0.6, "y": 0.6}


def test_search_winner_gets_its_test_scores_after_promotion(tmp_path: Path) -> None:
    archive, job, driver = make(tmp_path, spec(budget=12, references=False))
    report = driver.run()
    best = archive.best(job)
    source = archive.candidate(best.info["source"])
    assert best.kind == "final" and source.kind == "search" and best.test is not None
    assert report["best"]["fitness"] == pytest.approx(best.fitness) and report["best"]["chosen_from"] == source.id


def test_strategy_is_warm_started_with_the_reference_scores(tmp_path: Path) -> None:
    archive, job, driver = make(tmp_path, spec(budget=14, strategy="pso"))
    seen: list[Any] = []
    warm_start = driver.strategy.warm_start
    driver.strategy.warm_start = lambda refs: (seen.extend(refs), warm_start(refs))  # type: ignore[method-assign]
    driver.run()
    refs = {c.name: c for c in archive.candidates(job, kind="reference")}
    assert {r.name for r in seen} == set(refs)
    assert all(r.result.fitness == pytest.approx(refs[r.name].fitness) and r.result.number < 0 for r in seen)
    # PSO's base and expert particles took the references' scores: generation 0 asked only the others.
    generation0 = [c for c in archive.candidates(job, kind="search") if c.generation == 0]
    assert {c.info["particle"] for c in generation0}.isdisjoint(range(4))


def test_objective_weights_and_normalisation(tmp_path: Path) -> None:
    s = spec(budget=4).model_copy(update={"objective": ObjectiveSpec(weights={"x": 3.0}, normalize="base_expert")})
    archive, job, driver = make(tmp_path, s)
    driver.run()
    refs = {c.name: c.dev for c in archive.candidates(job, kind="reference")}
    low = refs["base"]
    best = {t: max(refs[f"expert:{e}"][t] for e in EXPERTS) for t in ("x", "y")}
    for c in archive.candidates(job, kind="search", status="done"):
        norm = {t: (c.dev[t] - low[t]) / ((best[t] - low[t]) if best[t] - low[t] > 1e-6 else 1.0) for t in c.dev}
        assert c.fitness == pytest.approx((3 * norm["x"] + norm["y"]) / 4)


def test_max_minutes_stops_asking_and_still_chooses(tmp_path: Path) -> None:
    s = spec(budget=50)
    s = s.model_copy(update={"search": s.search.model_copy(update={"max_minutes": 1e-9})})
    _, _, driver = make(tmp_path, s)
    report = driver.run()
    assert report["evaluations"] < 50 and report["status"] == "done" and report["best"]["test"] is not None


def test_objective_naming_an_unknown_task_is_refused_in_one_line() -> None:
    from orchestrator.jobspec import JobError, parse_job

    data = spec().to_json() | {"objective": {"weights": {"z": 1.0}}}
    with pytest.raises(JobError, match="objective.weights: no task named 'z'") as err:
        parse_job(data, Path("/"))
    assert "\n" not in str(err.value)


def test_max_minutes_counts_the_time_earlier_runs_took(tmp_path: Path) -> None:
    """A resumed job has what its earlier runs left of `search.max_minutes`; time stopped is not counted."""
    from datetime import timedelta

    from sqlalchemy import update

    from orchestrator.archive import Event, now

    s = spec(budget=12)
    s = s.model_copy(update={"search": s.search.model_copy(update={"max_minutes": 0.5})})
    archive, job, driver = make(tmp_path, s)
    at = now()
    earlier = [(at - timedelta(seconds=100), "job running"), (at - timedelta(seconds=80), "x"),  # ran 20 s
               (at - timedelta(seconds=60), "job running"), (at - timedelta(seconds=45), "y")]  # ran 15 s

    def backdate(ses: Any) -> None:  # the job was created before its earlier runs
        ses.execute(update(Event).where(Event.job_id == job).values(at=at - timedelta(seconds=200)))
        ses.add_all(Event(job_id=job, at=t, message=m) for t, m in earlier)

    archive.transaction(backdate)
    assert archive.run_seconds(job) == pytest.approx(35.0, abs=1.0)  # not the 40 s stopped between
    report = driver.run()  # 35 s of the 30 s spent: it asks nothing and chooses among the references
    assert report["evaluations"] == 0 and report["status"] == "done" and report["best"] is not None
    assert any("max_minutes reached" in e.message for e in archive.events(job))
