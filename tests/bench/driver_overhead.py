"""The driver's own cost per candidate: a no-op evaluator, 64 simulated workers, the SQLite archive.

    python -m tests.bench.driver_overhead [--budget 3000] [--workers 64] [--strategy random]

Everything but the evaluation is real: the strategy's ask/tell and state, every archive transaction
(asked candidates with the checkpoint, start, finish with the checkpoint), on SQLite in WAL mode in a temp dir.
Prints one JSON line; the target is under 5 ms per candidate, so one head can drive hundreds of GPU workers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.archive import Archive
from orchestrator.driver import Driver
from orchestrator.jobspec import JobSpec
from orchestrator.launch import run_settings
from orchestrator.pool import LocalPool, Work

TARGET_MS = 5.0


def no_op(work: Work) -> dict[str, Any]:
    scores = {split: {"t": 0.5} for split in work.splits}
    return {"ok": True, **scores, "per_example": {"t": [0.5]}, "sparsity": 0.0, "timings": {"evaluate": 0.0},
            "worker": "local"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--strategy", default="random")
    args = parser.parse_args()
    spec = JobSpec.model_validate({
        "name": "bench",
        "models": {"base": "/m/base", "experts": {e: f"/m/{e}" for e in ("a", "b", "c")}},
        "tasks": [{"name": "t", "path": "/t"}],
        "search": {"strategy": args.strategy, "budget": args.budget, "seed": 0},
        "workers": {"count": args.workers},
        "references": False,
    })
    with tempfile.TemporaryDirectory() as tmp:
        archive = Archive(f"sqlite:///{Path(tmp) / 'archive.db'}")
        job = archive.create_job(spec.to_json(), spec.name)
        driver = Driver(archive, spec, job, LocalPool(no_op, args.workers), run_settings(spec, num_layers=24))
        start = time.perf_counter()
        driver.run()
        seconds = time.perf_counter() - start
        done = archive.counts(job).get("done", 0)
    per_ms = 1000 * seconds / done
    print(json.dumps({
        "bench": "driver_overhead", "strategy": args.strategy, "workers": args.workers, "candidates": done,
        "seconds": round(seconds, 3), "ms_per_candidate": round(per_ms, 3), "target_ms": TARGET_MS,
        "ok": per_ms < TARGET_MS and done == args.budget,
    }))


if __name__ == "__main__":
    main()
