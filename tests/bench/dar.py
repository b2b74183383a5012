"""Dynamic Average Reward: the same RMM search on the full dev split and on 10% and 5% chunks.

    python -m tests.bench.dar [--zoo DIR] [--budget 400] [--scales 1.0,0.1,0.05] [--seeds 0,1,2] [--workers 2]

Runs one RMM job per data scale and seed on the zoo (the full profile at ~/.mergesearch/zoo by default, built
if missing) and prints one JSON line: per scale, averaged over the seeds (and per seed), the dev examples
evaluated by the search (every candidate's chunk, plus the final candidates' whole dev split), wall seconds,
and the final policy's held-out test mean (0-100). The issue's target: at 10%, at least 5x fewer examples for
a test score within 1 point of full data. One seed's final policy depends on its run, so compare means.
The defaults (9 jobs) take about 20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from orchestrator.archive import Archive
from orchestrator.jobspec import load_job, with_overrides
from orchestrator.launch import ray_pool, run_job, run_settings
from workers.zoo import build_zoo


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", type=Path, default=Path("~/.mergesearch/zoo").expanduser())
    parser.add_argument("--budget", type=int, default=400)
    parser.add_argument("--scales", default="1.0,0.1,0.05")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated search seeds; results are averaged")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    build_zoo(args.zoo, profile="full")
    base = load_job(args.zoo / "job.yaml")
    archive = Archive(f"sqlite:///{tempfile.mkdtemp()}/dar.db")
    dev_sizes = {t.name: len((t.path / "dev.jsonl").read_text().splitlines()) for t in base.tasks}
    results: dict[str, dict] = {}
    for scale in (float(s) for s in args.scales.split(",")):
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            search = {"strategy": "rmm", "budget": args.budget, "seed": seed, "params": {"data_scale": scale}}
            spec = with_overrides(base, search=search, workers={"count": args.workers})
            spec = spec.model_copy(update={"references": False})
            settings = run_settings(spec)
            chunk = settings.dev_subset
            job = archive.create_job(spec.to_json(), f"dar-{scale}-{seed}")
            started = time.perf_counter()
            with ray_pool(spec) as pool:
                run_job(archive, spec, job, pool, settings)
            wall = time.perf_counter() - started
            rows = archive.candidates(job, kind="search", status="done")
            examples = sum(
                sum(dev_sizes.values()) if c.subset == -1 else sum(min(chunk, n) for n in dev_sizes.values())
                for c in rows
            )
            policy = next((c for c in rows if c.info.get("role") == "policy"), None)
            test = policy.test if policy is not None and policy.test else {}
            runs.append(
                {
                    "seed": seed,
                    "evaluations": len(rows),
                    "examples": examples,
                    "wall_s": round(wall, 1),
                    "final_test": round(100 * sum(test.values()) / max(len(test), 1), 2),
                }
            )
        results[str(scale)] = {
            "chunk": chunk,
            **{
                key: round(sum(r[key] for r in runs) / len(runs), 2)
                for key in ("examples", "wall_s", "final_test")
            },
            "runs": runs,
        }
    full = results.get("1.0")
    if full:
        for r in results.values():
            r["examples_ratio"] = round(full["examples"] / r["examples"], 2)
            r["test_gap_points"] = round(r["final_test"] - full["final_test"], 2)
    print(json.dumps({"bench": "dar", "budget": args.budget, "results": results}))


if __name__ == "__main__":
    main()
