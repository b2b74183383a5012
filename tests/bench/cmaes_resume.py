"""What resuming a CMA-ES job costs: loading its checkpoint replays every generation's ask/tell through cma.

    python -m tests.bench.cmaes_resume [--generations 200] [--popsize 20]

A 64-layer × 4-expert task-arithmetic space (per-layer weights: D = 256 genes), driven for `generations`
generations of `popsize` candidates on a synthetic fitness, then loaded from its checkpoint into a fresh
strategy. Reported: the run's and the load's wall and CPU seconds (ask/tell only, no evaluation), the
checkpoint's JSON size, and whether the loaded optimizer's mean and step size equal the original's. The
strategy runs cma on one BLAS thread whatever OPENBLAS_NUM_THREADS says (reported as `blas_threads_env`: run
it with 2 to see that the setting no longer matters).

Prints one JSON line; target: a load under 5 s for 200 generations (`ok`, judged on CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from search.base import Result, StrategyBase, make_strategy
from search.space import SearchSpace, SpaceSpec

TARGET_S = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=200)
    parser.add_argument("--popsize", type=int, default=20)
    args = parser.parse_args()
    space = SearchSpace(SpaceSpec(granularity="layer"), 64, "base", ["math", "code", "chat", "sort"], seed=1)
    budget = args.generations * args.popsize

    def strategy() -> StrategyBase:
        return make_strategy("cmaes", space, budget, seed=0, params={"popsize": args.popsize})

    run = strategy()
    start, start_cpu = time.perf_counter(), time.process_time()
    while not run.done():
        batch = run.ask(args.popsize)
        run.tell([Result(c.number, -float(np.sum((np.array(c.genome) - 0.3) ** 2))) for c in batch])
    run_wall, run_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    state = json.loads(json.dumps(run.state_dict()))
    loaded = strategy()
    start, start_cpu = time.perf_counter(), time.process_time()
    loaded.load_state_dict(state)
    load_wall, load_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    same = np.array_equal(loaded.es.mean, run.es.mean) and loaded.es.sigma == run.es.sigma  # type: ignore[attr-defined]
    print(json.dumps({
        "dim": space.dim,
        "popsize": args.popsize,
        "generations": args.generations,
        "blas_threads_env": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "run_wall_s": round(run_wall, 2),
        "run_cpu_s": round(run_cpu, 2),
        "load_wall_s": round(load_wall, 2),
        "load_cpu_s": round(load_cpu, 2),
        "checkpoint_kb": round(len(json.dumps(state)) / 1024, 1),
        "identical": bool(same),
        "ok": load_cpu < TARGET_S,
    }))


if __name__ == "__main__":
    main()
