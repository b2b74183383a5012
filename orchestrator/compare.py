"""Strategy comparison: the same problem, budget and seeds for each strategy, on one Ray pool.

Each (strategy, seed) is an ordinary job in the archive, so every candidate of a comparison can be browsed,
pulled and exported like any other. The static references are evaluated once, by the first job, and copied
with their scores into every later job, so each job warm-starts from them and may choose one as its model.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.archive import Archive
from orchestrator.driver import Progress
from orchestrator.jobs import job_report
from orchestrator.jobspec import JobSpec, with_overrides
from orchestrator.launch import RunSettings, run_job, run_settings
from orchestrator.pool import Pool
from orchestrator.records import CandidateStatus, Kind


def run_comparison(
    spec: JobSpec,
    archive: Archive,
    pool: Pool,
    strategies: list[str],
    seeds: int,
    budget: int,
    on_progress: Callable[[str, Progress], None] | None = None,
    settings: Callable[[JobSpec], RunSettings] = run_settings,
) -> dict[str, Any]:
    """Run every strategy for every seed on `pool`; returns per-run reports and best-so-far curves. Each run
    derives its own settings (`settings`) from its spec, so one strategy's chunking never leaks into another's."""
    runs: list[dict[str, Any]] = []
    references: dict[str, Any] | None = None
    ideal: dict[str, Any] | None = None
    shared: list[dict[str, Any]] = []
    for strategy in strategies:
        for seed in range(seeds):
            params = spec.search.params if strategy == spec.search.strategy else {}  # others: paper defaults
            search = {"strategy": strategy, "budget": budget, "seed": seed, "params": params}
            job_spec = with_overrides(spec, search=search).model_copy(
                update={"references": True, "name": f"{spec.name}-{strategy}-s{seed}"}
            )
            job_id = archive.create_job(job_spec.to_json(), job_spec.name, owner="compare")
            if shared:
                archive.add_candidates(job_id, shared)
            label = f"{strategy} seed {seed}"
            run_job(
                archive, job_spec, job_id, pool, settings(job_spec),
                on_progress=(lambda p, label=label: on_progress(label, p)) if on_progress else None,
            )
            report = job_report(archive, job_id)
            if references is None:
                references, ideal = report["references"], report["ideal"]
                done = archive.candidates(job_id, kind=Kind.REFERENCE, status=CandidateStatus.DONE)
                shared = [_copy(c) for c in done]
            runs.append({"strategy": strategy, "seed": seed, "job_id": job_id, "report": report,
                         "curve": best_so_far(archive, job_id)})
    assert references is not None and ideal is not None
    return {"runs": runs, "references": references, "ideal": ideal, "budget": budget, "seeds": seeds}


def best_so_far(archive: Archive, job_id: int) -> list[float]:
    """Best dev fitness after each evaluation, in the order candidates were asked (failures count)."""
    best, curve = float("-inf"), []
    for cand in archive.candidates(job_id, kind=Kind.SEARCH, order="id", descending=False):
        if cand.status == CandidateStatus.DONE and cand.fitness is not None:
            best = max(best, cand.fitness)
        curve.append(best if best > float("-inf") else 0.0)
    return curve


def _copy(row: Any) -> dict[str, Any]:
    """A finished reference row as a new job's row, scores included (nothing is evaluated again)."""
    keys = ("kind", "name", "recipe", "recipe_hash", "subset", "status", "dev", "test", "fitness", "per_example",
            "sparsity", "timings", "worker")
    return {k: getattr(row, k) for k in keys}


def static_merges(references: dict[str, Any]) -> dict[str, Any]:
    """The static merge references: neither an expert alone nor the base."""
    return {k: v for k, v in references.items() if not k.startswith("expert:") and k != "base"}


def summarize(result: dict[str, Any], tasks: list[str], ceiling: float | None = None) -> list[dict[str, Any]]:
    """One row per strategy: test (and dev) mean and spread over seeds, the worst seed against the best static
    merge's test mean, the mean as a fraction of the zoo's merge `ceiling` (if given), and the evaluations
    each seed's best-so-far dev fitness took to pass the best static merge's."""
    static = static_merges(result["references"])
    best_static_dev = max(_mean(v["dev"]) for v in static.values())
    best_static_test = max(_mean(v["test"]) for v in static.values())
    rows = []
    for strategy in dict.fromkeys(r["strategy"] for r in result["runs"]):
        runs = [r for r in result["runs"] if r["strategy"] == strategy]
        bests = [r["report"]["best"] or {} for r in runs]
        test_means = [_mean(b.get("test") or {}) for b in bests]
        dev_means = [_mean(b.get("dev") or {}) for b in bests]
        beat = [next((i + 1 for i, f in enumerate(r["curve"]) if f > best_static_dev), None) for r in runs]
        rows.append({
            "strategy": strategy,
            "test_mean": statistics.fmean(test_means),
            "test_sd": statistics.pstdev(test_means),
            "test_means": test_means,
            "worst_vs_best_static": min(test_means) - best_static_test,
            "fraction_of_ceiling": statistics.fmean(test_means) / ceiling if ceiling else None,
            "dev_mean": statistics.fmean(dev_means),
            "per_task_test": {t: statistics.fmean((b.get("test") or {}).get(t, 0.0) for b in bests) for t in tasks},
            "evals_to_beat_static": beat,
        })
    return rows


def plot_curves(result: dict[str, Any], path: Path) -> Path:
    """Best-so-far dev fitness against evaluations: one line per strategy, a band over seeds."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), dpi=120)
    ax = fig.add_subplot()
    for strategy in dict.fromkeys(r["strategy"] for r in result["runs"]):
        curves = [r["curve"] for r in result["runs"] if r["strategy"] == strategy]
        n = min(len(c) for c in curves)
        data = np.array([c[:n] for c in curves])
        x = np.arange(1, n + 1)
        (line,) = ax.plot(x, data.mean(axis=0), label=strategy)
        ax.fill_between(x, data.min(axis=0), data.max(axis=0), color=line.get_color(), alpha=0.15)
    name, ref = max(static_merges(result["references"]).items(), key=lambda kv: _mean(kv[1]["dev"]))
    ax.axhline(_mean(ref["dev"]), color="grey", linestyle="--", label=f"best static ({name})")
    ax.axhline(_mean(result["ideal"]["dev"]), color="black", linestyle=":", label="ideal (best expert per task)")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best-so-far dev fitness (mean task score)")
    ax.set_title(f"strategies at budget {result['budget']}, {result['seeds']} seeds (band: min–max)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _mean(scores: dict[str, float] | None) -> float:
    return statistics.fmean(scores.values()) if scores else 0.0
