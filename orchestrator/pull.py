"""`pull`: re-materialize an archived candidate from its source models into a Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.archive import Archive, Candidate
from orchestrator.jobspec import JobSpec
from orchestrator.launch import open_sources
from workers.materialize import write_merged
from workers.recipe import Recipe


def pull(archive: Archive, cand: Candidate, out: Path, device: str = "cpu") -> Path:
    """Write `cand` (chosen by `Jobs.pullable`) to `out`, with recipe.json and a model card."""
    job = archive.job(cand.job_id)
    spec = JobSpec.model_validate(job.spec)
    recipe = Recipe.parse(cand.recipe)
    folder = write_merged(recipe, open_sources(spec), Path(out), device=device)
    (folder / "recipe.json").write_text(json.dumps(recipe.to_json(), indent=2))
    (folder / "README.md").write_text(model_card(job.name, job.id, cand.to_json(), spec))
    return folder


def model_card(job_name: str, job_id: int, cand: dict[str, Any], spec: JobSpec) -> str:
    def row(split: str) -> str:
        scores = cand.get(split) or {}
        return " | ".join(f"{scores[t.name]:.3f}" if t.name in scores else "–" for t in spec.tasks)

    tasks = " | ".join(t.name for t in spec.tasks)
    return f"""---
library_name: transformers
tags: [merge, mergesearch]
---
# {job_name} — candidate {cand["id"]}

Merged by [mergesearch](https://pypi.org/project/mergesearch/) from job {job_id} ({spec.search.strategy},
budget {spec.search.budget}). Base model `{spec.models.base}`; experts {", ".join(f"`{e}`" for e in spec.models.experts)}.

| split | {tasks} |
|---|{"---|" * len(spec.tasks)}
| dev (search) | {row("dev")} |
| test (held out) | {row("test")} |

Fitness (mean dev score): {cand["fitness"]}; task-vector sparsity: {cand.get("sparsity")}.
The exact recipe is in `recipe.json`; `mergesearch merge recipe.json` reproduces these weights.
"""
