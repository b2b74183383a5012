"""The dashboard's pictures as data: a recipe's coefficient heatmap, its mergekit YAML, each strategy's panel.

The browser only draws; everything here is plain JSON so that the shapes can be tested without a browser.
"""

from __future__ import annotations

import math
from typing import Any

from orchestrator.archive import Archive, Job
from orchestrator.dashboard.queries import genomes_by_generation, sparsity_by_generation
from workers.recipe import Recipe, RecipeError

Cell = float | str | None


def recipe_heatmap(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe as rows (output layers, their attn/mlp overrides, `rest`, `head`) × coefficient columns.

    Each numeric parameter is a column; a per-expert list (as long as the experts) is one column per expert,
    `weights·math`; other lists are indexed, `order[0]`. Text parameters (copy's `model`) are text cells.
    """
    parsed = Recipe.parse(recipe)
    experts = parsed.models.experts
    rows: list[tuple[str, int | None, str, dict[str, Any]]] = []
    for i, layer in enumerate(parsed.layers):
        rows.append((f"L{i}", layer.from_, layer.op, layer.params))
        for module in ("attn", "mlp"):
            override = getattr(layer, module)
            if override is not None:
                rows.append((f"L{i} {module}", layer.from_, override.op, override.params))
    rows.append(("rest", None, parsed.rest.op, parsed.rest.params))
    if parsed.head is not None:
        rows.append(("head", None, parsed.head.op, parsed.head.params))
    flat = [_flatten(params, experts) for *_, params in rows]
    columns = list(dict.fromkeys(name for cells in flat for name in cells))
    return {
        "rows": [label for label, *_ in rows],
        "sources": [source for _, source, *_ in rows],
        "ops": [op for _, _, op, _ in rows],
        "columns": columns,
        "values": [[cells.get(name) for name in columns] for cells in flat],
    }


def _flatten(params: dict[str, Any], experts: list[str]) -> dict[str, Cell]:
    cells: dict[str, Cell] = {}
    for name, value in params.items():
        if isinstance(value, bool):
            cells[name] = str(value).lower()
        elif isinstance(value, (int, float)):
            cells[name] = float(value)
        elif isinstance(value, str):
            cells[name] = value
        elif isinstance(value, list):
            labels = experts if len(value) == len(experts) else [f"[{i}]" for i in range(len(value))]
            for label, item in zip(labels, value):
                key = f"{name}·{label}" if label in experts else f"{name}{label}"
                cells[key] = (
                    float(item)
                    if isinstance(item, (int, float)) and not isinstance(item, bool)
                    else str(item)
                )
    return cells


def mergekit_export(recipe: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The recipe as a mergekit YAML over the job's model paths, and what mergekit cannot express."""
    from workers.mergekit_config import recipe_to_mergekit

    parsed = Recipe.parse(recipe)
    paths = {parsed.models.base: spec["models"]["base"], **spec["models"]["experts"]}
    try:
        text, problems = recipe_to_mergekit(parsed, {name: str(path) for name, path in paths.items()})
    except RecipeError as exc:
        return {"yaml": None, "problems": [str(exc)]}
    return {"yaml": text or None, "problems": problems}  # nothing translated: no YAML at all


def strategy_panel(archive: Archive, job: Job) -> dict[str, Any]:
    """What the job's strategy adds to its page: SAE's sparsity schedule, PSO's swarm spread, RMM's map."""
    builders = {"sae": sae_schedule, "pso": swarm_spread, "rmm": rmm_merge_map}
    build = builders.get(job.strategy)
    return {"kind": None} if build is None else {"kind": job.strategy, **build(archive, job)}


def sae_schedule(archive: Archive, job: Job) -> dict[str, Any]:
    """Target sparsity per generation (the annealing schedule: generation g ≥ 1 prunes to s(g − 1)) against
    the mean sparsity measured on each generation's candidates."""
    from search.strategies.sae import SAEParams, sparsity_schedule

    params = SAEParams.model_validate(job.spec.get("search", {}).get("params") or {})
    checkpoint = archive.last_checkpoint(job.id)
    current = int(checkpoint.state.get("generation", 0)) if checkpoint else 0
    measured = sparsity_by_generation(archive, job.id)
    horizon = max(current, *measured["generation"], 0) + params.t0
    step = max(1, math.ceil(horizon / 400))
    generations = list(range(1, horizon + 1, step))
    return {
        "generation": current,
        "schedule": {
            "generation": generations,
            "target": [
                sparsity_schedule(g - 1, params.s_min, params.s_max, params.t0, params.t_mult)
                for g in generations
            ],
        },
        "measured": measured,
    }


def swarm_spread(archive: Archive, job: Job) -> dict[str, Any]:
    """Per PSO iteration, the root-mean-square distance of the particles' coefficients to their centroid.

    A swarm that has collapsed onto its best particle has spread 0: its search has stopped exploring.
    """
    import numpy as np

    iterations, spread = [], []
    for generation, genomes in genomes_by_generation(archive, job.id).items():
        positions = np.asarray(genomes, dtype=float)
        centred = positions - positions.mean(0)
        iterations.append(generation)
        spread.append(float(np.sqrt((centred**2).sum(1).mean())))
    return {"iteration": iterations, "spread": spread}


def rmm_merge_map(archive: Archive, job: Job) -> dict[str, Any]:
    """The merge map the RMM agent's deterministic policy would build now, from its last checkpoint."""
    from search.rmm.plot import policy_merge_map

    checkpoint = archive.last_checkpoint(job.id)
    if checkpoint is None or "agent" not in checkpoint.state:
        return {"merge_map": None}
    merge_map = policy_merge_map(checkpoint.state)
    return {
        "merge_map": {
            "counts": merge_map.count_map,
            "layers": merge_map.layer_labels,
            "sources": merge_map.action_labels,
        },
        "checkpoint": checkpoint.id,
    }
