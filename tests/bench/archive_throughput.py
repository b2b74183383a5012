"""The archive on SQLite: finishing candidates per second, and the top 50 of 100,000 candidates.

    python -m tests.bench.archive_throughput [--finish 3000] [--rows 100000]

`finish`: candidates finished as the driver does it: the completions of one wait (up to one per worker; 64
here) in one transaction with the strategy checkpoint after telling them (a state of ~10 kB, as a population
strategy's); also reported for batches of one, the slowest case (one worker finishing at a time). `top50`: the best 50 of a job with `--rows` finished
candidates, sorted and paged in SQL, as the API and dashboard ask for it; plus the count of the page total.
Prints one JSON line. Targets: at least 1,000 finished candidates/s; top 50 under 100 ms.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import tempfile
import time
from pathlib import Path

from orchestrator.archive import Archive
from workers.recipe import FORMAT

FINISH_TARGET = 1000.0
WORKERS = 64
TOP_TARGET_MS = 100.0
RECIPE = {"format": FORMAT, "models": {"base": "base", "experts": ["a", "b", "c"]},
          "layers": [{"from": i, "op": "ties", "params": {"weights": [0.3, 0.3, 0.4], "density": 0.3}}
                     for i in range(24)],
          "rest": {"op": "linear", "params": {"weights": [0.34, 0.33, 0.33]}}, "seed": 0}


def rows(n: int, start: int = 0, **extra: object) -> list[dict[str, object]]:
    return [{"number": start + i, "recipe": RECIPE, "recipe_hash": f"{start + i:064d}", **extra} for i in range(n)]


def finish_rate(archive: Archive, n: int, batch: int) -> float:
    job = archive.create_job({"search": {"strategy": "random", "budget": n}}, "finish")
    ids = archive.add_candidates(job, rows(n))
    state = {"population": [[random.random() for _ in range(32)] for _ in range(16)], "told": 0}
    start = time.perf_counter()
    for step in range(0, n, batch):
        done = [(cid, {"status": "done", "fitness": random.random(), "dev": {"t": 0.5}, "timings": {"evaluate": 1.0}})
                for cid in ids[step : step + batch]]
        recorded = archive.finish_many(done, {**state, "told": step + len(done)}, step + len(done), job)
        assert len(recorded) == len(done)
    return n / (time.perf_counter() - start)


def top50_ms(archive: Archive, n: int) -> tuple[float, float]:
    job = archive.create_job({"search": {"strategy": "random", "budget": n}}, "big")
    rng = random.Random(0)
    for start in range(0, n, 10_000):
        batch = rows(min(10_000, n - start), start, status="done")
        for row in batch:
            row["fitness"] = rng.random()
        archive.add_candidates(job, batch)
    timings = []
    for _ in range(5):
        t = time.perf_counter()
        top = archive.candidates(job, kind="search", status="done", limit=50)
        total = archive.count(job, kind="search", status="done")
        timings.append(time.perf_counter() - t)
        assert len(top) == 50 and total == n
        assert all(a.fitness >= b.fitness for a, b in itertools.pairwise(top))
    return 1000 * min(timings), 1000 * sorted(timings)[len(timings) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finish", type=int, default=3000)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = Archive(f"sqlite:///{Path(tmp) / 'archive.db'}")
        rate = finish_rate(archive, args.finish, WORKERS)
        single = finish_rate(archive, args.finish // 3, 1)
        best_ms, median_ms = top50_ms(archive, args.rows)
    print(json.dumps({
        "bench": "archive_throughput", "backend": "sqlite", "finished_per_s": round(rate, 1),
        "batch": WORKERS, "finished_per_s_one_at_a_time": round(single, 1),
        "finish_target_per_s": FINISH_TARGET, "rows": args.rows, "top50_ms_median": round(median_ms, 2),
        "top50_ms_best": round(best_ms, 2), "top50_target_ms": TOP_TARGET_MS,
        "ok": rate >= FINISH_TARGET and median_ms < TOP_TARGET_MS,
    }))


if __name__ == "__main__":
    main()
