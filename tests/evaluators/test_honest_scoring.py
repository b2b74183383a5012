"""Dev and test never mix: the search sees dev scores only; test scores exist for references and the best.

A real worker on the zoo scores a task whose test targets are all wrong, so every test score is 0 while dev
scores are not: a test value leaking into a dev column, a fitness, or a search candidate's row would show.
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.archive import Archive
from orchestrator.driver import Driver
from orchestrator.jobspec import JobSpec
from orchestrator.launch import run_settings
from orchestrator.pool import LocalPool, Work, worker_setup
from workers.worker import ModelWorker


def honest_task(zoo_dir: Path, folder: Path) -> Path:
    """The zoo's copy prompts: right targets in dev, wrong ones (reversed, marked) in test."""
    folder.mkdir()
    for split in ("dev", "test"):
        rows = [
            json.loads(line)
            for line in (zoo_dir / "tasks" / "copy" / f"{split}.jsonl").read_text().splitlines()
        ]
        if split == "test":
            rows = [{"prompt": r["prompt"], "target": "wrong" + r["target"][::-1]} for r in rows]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return folder


def test_search_candidates_get_dev_scores_only_references_and_the_best_get_test_scores(
    zoo_dir: Path, tmp_path: Path
) -> None:
    spec = JobSpec.model_validate(
        {
            "models": {
                "base": str(zoo_dir / "base"),
                "experts": {n: str(zoo_dir / "experts" / n) for n in ("copy", "reverse")},
            },
            "tasks": [
                {"name": "copy", "path": str(honest_task(zoo_dir, tmp_path / "copy")), "max_new_tokens": 12}
            ],
            "evaluation": {"dev_subset": 2},
            "search": {"strategy": "random", "budget": 3, "seed": 1},
            "workers": {"count": 1},
        }
    )
    worker = ModelWorker(worker_setup(spec))
    asked: list[Work] = []

    def evaluate(work: Work) -> dict:
        asked.append(work)
        return worker.evaluate(work.recipe, work.subset, work.splits, work.dev_subset)

    archive = Archive(f"sqlite:///{tmp_path / 'archive.db'}")
    job = archive.create_job(spec.to_json(), "honest")
    settings = run_settings(spec, num_layers=worker.sources.num_layers)
    Driver(archive, spec, job, LocalPool(evaluate, 1), settings).run()

    references = archive.candidates(job, kind="reference", status="done")
    search = archive.candidates(job, kind="search", status="done")
    best = archive.best(job)
    assert len(references) == 6 and len(search) == 3 and best is not None and best.kind == "final"
    assert all(c.test == {"copy": 0.0} for c in [*references, best])
    assert all(c.test is None for c in search)
    assert max(c.dev["copy"] for c in references) > 0  # the copy expert: dev is not test in disguise
    assert best.fitness == best.dev["copy"] and best.info["dev_full"]["copy"] > 0
    reference_ids = {c.id for c in references}
    test_runs = [w for w in asked if "test" in w.splits and w.cand_id not in reference_ids]
    assert [w.cand_id for w in test_runs] in ([best.id], [])  # [] when a reference won: its test is known
    assert all(w.subset == -1 and w.splits == ("test",) for w in test_runs)
