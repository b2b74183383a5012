"""`compare` runs every strategy from one spec on one pool: each with its own run settings, none stored."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from orchestrator.archive import Archive
from orchestrator.compare import run_comparison
from orchestrator.jobspec import parse_job
from orchestrator.pool import LocalPool, Work
from tests.service.fixtures import hashed_score, job_data, make_data_root


def test_strategies_after_rmm_get_their_own_chunking(tmp_path: Path) -> None:
    root = make_data_root(tmp_path / "data", examples=8)
    rmm = {"strategy": "rmm", "budget": 4, "params": {"data_scale": 0.25}}
    data = job_data(budget=4, workers=2, search=rmm)
    spec = parse_job(data, root)
    archive = Archive(f"sqlite:///{tmp_path / 'a.db'}")
    chunks: list[tuple[int, int | None, int]] = []

    def evaluate(work: Work) -> dict[str, Any]:
        chunks.append((work.cand_id, work.dev_subset, work.subset))
        return hashed_score(work)

    result = run_comparison(spec, archive, LocalPool(evaluate, 2), ["rmm", "sae", "cmaes"], seeds=1, budget=4)
    job_of = {run["job_id"]: run["strategy"] for run in result["runs"]}
    sizes: dict[str, set[int | None]] = defaultdict(set)
    for cand_id, dev_subset, subset in chunks:
        if subset != -1:  # the whole split: no chunk
            sizes[job_of[archive.candidate(cand_id).job_id]].add(dev_subset)
    # 8 dev examples in round(1/0.25) = 4 chunks for RMM; the job file's 4 examples for the others
    assert sizes == {"rmm": {2}, "sae": {4}, "cmaes": {4}}
    for job_id in job_of:
        assert archive.job(job_id).spec["evaluation"]["dev_subset"] == 4
