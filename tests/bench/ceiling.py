"""The zoo's merge ceiling: what a long search over weight merges reaches, scored on held-out test data.

Run: `python -m tests.bench.ceiling [JOB_YAML] [--budget 1000] [--granularity global|layer] [--seed 0]`
(default job: the full zoo's, ~/.mergesearch/zoo/job.yaml). A CMA-ES job over unnormalised task-arithmetic
weights (the default space, at the given granularity) runs for `budget` evaluations, warm-started from the
references like any job; its model is chosen as every job's is (the top candidates re-scored on the whole dev
split, references included) and scored on test. Prints one JSON line; its `ceiling` (test mean) is what
`mergesearch compare --ceiling` reports fractions of. A budget-64 strategy near it has found what weight
merging can give on this zoo; the ideal model (per-task best expert) is usually out of reach of any merge.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from orchestrator.archive import Archive
from orchestrator.jobspec import load_job, with_overrides
from orchestrator.launch import ray_pool, run_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default="~/.mergesearch/zoo/job.yaml")
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--granularity", choices=("global", "layer"), default="global")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    spec = load_job(Path(args.job).expanduser())
    space = {"op": "task_arithmetic", "granularity": args.granularity, "modules": False,
             "weight_range": (0.0, 1.2), "density": False, "params": {}}
    spec = with_overrides(spec, search={"strategy": "cmaes", "budget": args.budget, "seed": args.seed,
                                        "params": {}}, space=space)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder, ray_pool(spec) as pool:
        archive = Archive(f"sqlite:///{folder}/ceiling.db")
        job = archive.create_job(spec.to_json(), "ceiling", owner="bench")
        report = run_job(archive, spec, job, pool)
    best = report["best"]
    static = {k: statistics.fmean(v["test"].values()) for k, v in report["references"].items()
              if not k.startswith("expert:") and k != "base"}
    print(json.dumps({
        "bench": "ceiling", "job": str(args.job), "budget": args.budget, "granularity": args.granularity,
        "evaluations": report["evaluations"], "seconds": round(time.perf_counter() - started, 1),
        "ceiling": round(statistics.fmean(best["test"].values()), 4),
        "tasks": {t: round(v, 4) for t, v in best["test"].items()},
        "dev_full_mean": round(statistics.fmean(best["dev"].values()), 4),
        "weights": best["recipe"]["layers"][0]["params"].get("weights"),
        "chosen": best["recipe"]["layers"][0]["op"],
        "ideal": round(statistics.fmean(report["ideal"]["test"].values()), 4),
        "best_static": round(max(static.values()), 4),
    }))


if __name__ == "__main__":
    main()
