"""What one candidate costs: materialize in place + evaluate, against a disk round trip (write + reload).

    python -m tests.bench.candidate_cost [--zoo DIR] [--candidates N] [--examples N] [--threads N]

Candidates are recipes as each strategy makes them, with random coefficients (see `random_recipe`). Prints
one JSON line: per op, the mean seconds to materialize in place and to
`write_merged` + `from_pretrained` the same recipe, `speedup` = disk round trip / in place (target >= 5); and
the mean seconds to evaluate a candidate on every task.

Without `--zoo`, the tests' quick zoo (`~/.cache/mergesearch/test-zoo-<version>`) is used, built first with
`workers.zoo.build_zoo(profile="quick")` if missing (minutes).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from evaluators.hf import HFBackend
from evaluators.tasks import Task, load_task
from workers.materialize import ResidentModel, write_merged
from workers.recipe import Recipe
from workers.sources import Sources
from workers.zoo import TASKS, ZOO_VERSION, build_zoo


def load_zoo(root: Path) -> tuple[Path, dict[str, Path], list[Task]]:
    """A built zoo's base, experts and tasks (dev split), as its zoo.json lists them."""
    names = json.loads((root / "zoo.json").read_text())["tasks"]
    experts = {name: root / "experts" / name for name in names}
    tasks = [load_task(n, root / "tasks" / n, max_new_tokens=TASKS[n].max_new_tokens) for n in names]
    return root / "base", experts, tasks


def random_recipe(rng: random.Random, op: str, experts: list[str], n_layers: int) -> Recipe:
    """A candidate as each strategy makes them, with random coefficients: `ties` (random search and CMA-ES
    over the default space), `magnitude_prune` with `scope: merged` (SAE), `dare_affine` (PSO), plain
    `task_arithmetic`, or `copy`: an RMM-like stack of whole layers from random models and source depths
    (skips and repeats included). Like a search run, every candidate keeps the run's recipe seed."""
    models = ["base", *experts]

    def weights() -> list[float]:
        return [round(rng.uniform(0.1, 1.0), 3) for _ in experts]

    def spec() -> dict:
        density = round(rng.uniform(0.1, 0.9), 3)
        params = {
            "ties": lambda: {"weights": weights(), "density": density},
            "magnitude_prune": lambda: {"weights": weights(), "density": density, "scope": "merged"},
            "dare_affine": lambda: {"dense": weights(), "sparse": weights(), "density": 0.2},
            "task_arithmetic": lambda: {"weights": weights()},
            "copy": lambda: {"model": rng.choice(models)},
        }[op]()
        return {"op": op, "params": params}

    froms = sorted(rng.choices(range(n_layers), k=n_layers)) if op == "copy" else range(n_layers)
    return Recipe.parse(
        {
            "models": {"base": "base", "experts": experts},
            "layers": [{"from": i, **spec()} for i in froms],
            "rest": spec() if op != "copy" else {"op": "copy", "params": {"model": "base"}},
            "seed": 1234,
        }
    )


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def measure(
    base: Path,
    experts: dict[str, Path],
    tasks: list[Task],
    ops: list[str],
    n_candidates: int,
    n_examples: int,
    scratch: Path,
) -> dict:
    """Per op: mean in-place materialize and disk round trip, interleaved candidate by candidate so that the
    machine's other load hits both alike; evaluation (independent of the op) timed on the first op only.

    A worker merges hundreds of candidates, so the means are its steady state: the first candidate of each op
    (which fills the worker's memo of task vectors and magnitude ranks, and its layer pool) is timed apart as
    `first_in_place_s` and left out of the means, and so is the first disk round trip (a cold page cache).
    """
    sources = Sources(base, experts)
    resident = ResidentModel(sources)
    backend = HFBackend(resident.tokenizer)
    rng = random.Random(1)
    result: dict = {"bench": "candidate_cost", "params": sum(p.numel() for p in resident.model.parameters())}
    result |= {"experts": len(experts), "tasks": len(tasks), "examples_per_task": n_examples}
    result["candidates_per_op"] = n_candidates
    evaluate: list[float] = []
    for op in ops:
        in_place, round_trip, hits = [], [], 0
        for i in range(n_candidates + 1):
            recipe = random_recipe(rng, op, sources.experts, sources.num_layers)
            started = time.perf_counter()
            stats = resident.materialize(recipe)
            in_place.append(time.perf_counter() - started)
            hits += stats.cache_hits
            if op == ops[0]:
                started = time.perf_counter()
                for task in tasks:
                    backend.evaluate(resident.model, task, task.dev[:n_examples])
                evaluate.append(time.perf_counter() - started)
            out = scratch / f"{op}{i}"
            started = time.perf_counter()
            write_merged(recipe, sources, out)
            AutoModelForCausalLM.from_pretrained(out).eval()
            round_trip.append(time.perf_counter() - started)
            shutil.rmtree(out)
        first, in_place, round_trip = in_place[0], in_place[1:], round_trip[1:]
        result[op] = {
            "first_in_place_s": round(first, 5),
            "materialize_in_place_s": round(mean(in_place), 5),
            "disk_round_trip_s": round(mean(round_trip), 5),
            "speedup": round(mean(round_trip) / mean(in_place), 2),
            "layer_cache_hits": hits,
        }
    result["evaluate_s"] = round(mean(evaluate), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--zoo", type=Path, help="a built zoo (default: the tests' quick zoo, built if missing)"
    )
    parser.add_argument(
        "--candidates", type=int, default=16, help="timed candidates per op (after one warm-up)"
    )
    parser.add_argument("--examples", type=int, default=16, help="dev examples per task per candidate")
    parser.add_argument(
        "--ops",
        default="ties,magnitude_prune,dare_affine,task_arithmetic,copy",
        help="comma-separated merge ops",
    )
    # One thread, as a one-CPU worker slot: 2 threads on a busy 2-core box made elementwise ops 50x slower
    # (OpenMP threads waiting on each other).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    if args.zoo is None:
        args.zoo = Path(f"~/.cache/mergesearch/test-zoo-{ZOO_VERSION}").expanduser()  # shared with the tests
        build_zoo(args.zoo, profile="quick")  # returns at once when already built
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="candidate_cost-") as tmp:
        result = measure(*load_zoo(args.zoo), args.ops.split(","), args.candidates, args.examples, Path(tmp))
    result["zoo"] = str(args.zoo)
    result["threads"] = args.threads
    print(json.dumps(result))


if __name__ == "__main__":
    main()
