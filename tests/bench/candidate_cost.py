"""What one candidate costs at realistic sizes: materialized in place by a worker, against the disk round trips
a search without a resident model makes (our `write_merged` + `from_pretrained`, and, as the peers do,
`mergekit-yaml` + `from_pretrained`).

    python -m tests.bench.candidate_cost --size-gb 1 --size-gb 2 [--dtype float32 --dtype bfloat16]
        [--ops ties,magnitude_prune,dare_affine,copy] [--candidates 3] [--cache-gb GB] [--dir DIR]
        [--expert-nonzero 0.1]

For each size and dtype, a synthetic Llama-shaped base and three experts (`merge_memory`'s generator; each
expert changes `--expert-nonzero` of the entries, 10% by default, 1 for dense task vectors) are written under
`--dir` once and reused by later runs.

Worker: one process, sampled every 10 ms for its anonymous memory (RssAnon + RssShmem: what it allocates; the
memory-mapped sources are page cache), builds, per op (a worker serves one job, so one strategy), a
`ResidentModel` with `--cache-gb` (unset: the workers' default, by model size) for each of its two memos and
materializes a first candidate (it fills the memo and layer pool) and `--candidates` more: their median is the
steady state a search runs in (a search that changes every layer grows the spare-layer pool in its second
candidate, which costs it fresh pages). Candidates are recipes as
each strategy makes them (`random_recipe`). Disk: the first candidate of each op (of `--round-trip-ops`;
default all) written by `write_merged` and reloaded by `from_pretrained`, and, when mergekit is installed,
exported by `recipe_to_mergekit`, merged by `mergekit-yaml` and reloaded. mergekit cannot express SAE's
merged-scope trim or PSO's `dare_affine`; those candidates use the stand-in named in `mergekit_method` (TIES
at the same weights and density; DARE at the summed weights), which does comparable work. Every process gets
`--threads` threads. Wall and CPU seconds are reported for each path (on a shared machine CPU seconds compare
paths measured at different moments). Prints one JSON line per size and dtype.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils.logging import disable_progress_bar

from tests.bench.merge_memory import (
    GB,
    LLAMA,
    MERGEKIT,
    N_EXPERTS,
    Width,
    children_cpu_s,
    layers_for,
    model_bytes,
    run_sampled,
    write_models,
)
from workers.materialize import HeapTrim, ResidentModel, write_merged
from workers.mergekit_config import recipe_to_mergekit
from workers.recipe import Recipe
from workers.sources import Sources

OPS = ("ties", "magnitude_prune", "dare_affine", "copy")
NONZERO = 0.1
"""Default share of entries each expert changes (a short fine-tune's sparse task vector); 1 is dense."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GIB = 1024**3  # workers.cache_gb counts GiB


def random_recipe(rng: random.Random, op: str, experts: list[str], n_layers: int) -> Recipe:
    """A candidate as each strategy makes them, with random coefficients: `ties` per layer (random search and
    CMA-ES over the default space), `magnitude_prune` with `scope: merged` (SAE's pruned mixture),
    `dare_affine` (PSO), plain `task_arithmetic`, or `copy`: an RMM-like stack of whole layers from random
    models and source depths (skips and repeats included). Like a search run, every candidate keeps the run's
    recipe seed."""
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


def mergekit_stand_in(recipe: Recipe) -> tuple[Recipe, str]:
    """The recipe mergekit runs for a candidate, and its merge method: itself where mergekit can express it,
    else TIES at the same weights and density (SAE) or DARE at the summed weights (PSO)."""

    def swap(spec: dict) -> dict:
        p = spec["params"]
        if spec["op"] == "magnitude_prune":
            return {"op": "ties", "params": {"weights": p["weights"], "density": p["density"]}}
        if spec["op"] == "dare_affine":
            weights = [a + b for a, b in zip(p["dense"], p["sparse"], strict=True)]
            return {"op": "dare", "params": {"weights": weights, "density": p["density"], "rescale": "l1"}}
        return spec

    data = recipe.to_json()
    data["layers"] = [{"from": layer["from"], **swap(layer)} for layer in data["layers"]]
    data["rest"] = swap(data["rest"])
    swapped = Recipe.parse(data)
    method = {"magnitude_prune": "ties", "dare_affine": "dare_linear", "ties": "ties"}.get(
        recipe.layers[0].spec_for("mlp").op, "task_arithmetic"
    )
    return swapped, method


def candidates(op: str, sources: Sources, n: int) -> list[Recipe]:
    """The same `n` candidates of `op` for every path (seeded by the op)."""
    rng = random.Random(f"candidate_cost:{op}")
    return [random_recipe(rng, op, sources.experts, sources.num_layers) for _ in range(n)]


def worker(models: str, ops: str, n_candidates: int, cache_gb: float | None, threads: int) -> None:
    """The measured worker process: for each op in turn a new resident model (a worker serves one job, so one
    strategy: its memo holds what that strategy's candidates reuse) and its candidates; prints one JSON
    line."""
    torch.set_num_threads(threads)
    disable_progress_bar()
    sources = synthetic_sources(Path(models))
    out: dict = {"build_s": 0.0, "memo_gb": 0.0}
    for op in ops.split(","):
        started = time.perf_counter()
        budget = None if cache_gb is None else int(cache_gb * GIB)
        resident = ResidentModel(sources, source_cache_bytes=budget)
        out["build_s"] = max(out["build_s"], round(time.perf_counter() - started, 3))
        out["cache_gb"] = round(resident.memo.max_bytes / GIB, 3)
        seconds, cpu = [], []
        for recipe in candidates(op, sources, n_candidates + 1):
            started, cpu_started = time.perf_counter(), time.process_time()
            resident.materialize(recipe)
            seconds.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
            print(f"{op}: {seconds[-1]:.2f} s in place, {cpu[-1]:.2f} CPU s", file=sys.stderr, flush=True)
        out[op] = {
            "first_s": round(seconds[0], 3),
            "steady_s": round(statistics.median(seconds[1:]), 3),
            "first_cpu_s": round(cpu[0], 3),
            "steady_cpu_s": round(statistics.median(cpu[1:]), 3),
        }
        out["memo_gb"] = max(out["memo_gb"], round(resident.memo.bytes / GB, 3))
        out["source_cache_gb"] = round(resident.source_cache.bytes / GB, 3)
        del resident
        gc.collect()
        HeapTrim().trim()  # the next op's worker starts from what a new process would hold
    print(json.dumps(out))


def round_trips(
    op: str, sources: Sources, dtype: torch.dtype, scratch: Path, threads: int, mergekit: bool
) -> dict:
    """Seconds to write and reload the op's first candidate: ours, and mergekit's when installed."""
    recipe = candidates(op, sources, 1)[0]
    started, cpu = time.perf_counter(), time.process_time()
    write_merged(recipe, sources, scratch / "ours")
    written = time.perf_counter() - started
    AutoModelForCausalLM.from_pretrained(scratch / "ours", dtype=dtype)
    result = {"ours_write_s": round(written, 4), "ours_s": round(time.perf_counter() - started, 4)}
    result["ours_cpu_s"] = round(time.process_time() - cpu, 4)
    shutil.rmtree(scratch / "ours")
    if not (mergekit and MERGEKIT.exists()):
        return result
    stand_in, method = mergekit_stand_in(recipe)
    paths = {"base": str(sources.base_dir), **{n: str(sources.base_dir.parent / n) for n in sources.experts}}
    config, unexpressed = recipe_to_mergekit(stand_in, paths)
    (scratch / "mergekit.yaml").write_text(config)
    command = [
        str(MERGEKIT),
        str(scratch / "mergekit.yaml"),
        str(scratch / "mergekit"),
        "--no-copy-tokenizer",
    ]
    started, cpu = time.perf_counter(), time.process_time() + children_cpu_s()
    run = subprocess.run(
        [*command, "--no-write-model-card"], capture_output=True, text=True, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)},
    )  # fmt: skip
    if run.returncode != 0:
        return result | {"mergekit_error": (run.stderr.strip().splitlines() or [""])[-1]}
    written = time.perf_counter() - started
    AutoModelForCausalLM.from_pretrained(scratch / "mergekit", dtype=dtype)
    shutil.rmtree(scratch / "mergekit")
    result |= {"mergekit_write_s": round(written, 4), "mergekit_s": round(time.perf_counter() - started, 4)}
    result["mergekit_cpu_s"] = round(time.process_time() + children_cpu_s() - cpu, 4)
    return result | {"mergekit_method": method, "mergekit_unexpressed": len(unexpressed)}


def synthetic_models(
    root: Path, size_gb: float, dtype_name: str, width: Width = LLAMA, nonzero: float = NONZERO
) -> tuple[Path, int]:
    """The folder of a base and three experts of about `size_gb`, each changing a `nonzero` share of the
    entries (written once), and its depth."""
    dtype = DTYPES[dtype_name]
    layers = layers_for(size_gb, dtype, width)
    folder = root / f"llama-{width.hidden}x{layers}-{dtype_name}-nz{nonzero}"
    if not (folder / "complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        write_models(folder, layers, dtype, nonzero, width)
        (folder / "complete").touch()
    return folder, layers


def in_place_entry(worker: dict) -> dict:
    return {
        "in_place_s": worker["steady_s"],
        "first_in_place_s": worker["first_s"],
        "in_place_cpu_s": worker["steady_cpu_s"],
        "first_in_place_cpu_s": worker["first_cpu_s"],
    }


def synthetic_sources(folder: Path) -> Sources:
    return Sources(folder / "base", {f"expert{i}": folder / f"expert{i}" for i in range(N_EXPERTS)})


def bench(
    size_gb: float, dtype_name: str, args: argparse.Namespace, width: Width = LLAMA, timeout: float = 7200
) -> dict:
    folder, layers = synthetic_models(args.dir, size_gb, dtype_name, width, args.expert_nonzero)
    size = model_bytes(layers, DTYPES[dtype_name], width)
    result: dict = {
        "bench": "candidate_cost",
        "size_gb": round(size / GB, 3),
        "dtype": dtype_name,
        "layers": layers,
        "experts": N_EXPERTS,
        "expert_nonzero": args.expert_nonzero,
        "candidates_per_op": args.candidates,
        "threads": args.threads,
        "load_average": os.getloadavg()[0],
    }
    code = (
        "import sys; from tests.bench.candidate_cost import worker; "
        "worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) if sys.argv[4] != 'None' else None, "
        "int(sys.argv[5]))"
    )
    command = [sys.executable, "-c", code, str(folder), args.ops, str(args.candidates), str(args.cache_gb)]
    sampled = run_sampled([*command, str(args.threads)], timeout, keep_output=True)
    if "error" in sampled:
        return result | {"worker_error": sampled["error"]}
    in_place = json.loads(sampled.pop("output").strip().splitlines()[-1])
    print(json.dumps(in_place), file=sys.stderr, flush=True)
    result["cache_gb"] = in_place["cache_gb"]
    result["worker"] = {
        "peak_anon_gb": sampled["peak_anon_gb"],
        "peak_anon_per_model_size": round(sampled["peak_anon_gb"] * GB / size, 2),
        **{k: in_place[k] for k in ("build_s", "memo_gb", "source_cache_gb")},
    }
    torch.set_num_threads(args.threads)
    sources = synthetic_sources(folder)
    for op in args.ops.split(","):
        if op not in (args.round_trip_ops or args.ops).split(","):
            result[op] = in_place_entry(in_place[op])
            continue
        with tempfile.TemporaryDirectory(prefix="candidate_cost-", dir=args.dir) as scratch:
            disk = round_trips(op, sources, DTYPES[dtype_name], Path(scratch), args.threads, args.mergekit)
        entry = in_place_entry(in_place[op]) | disk
        for path in ("ours", "mergekit"):
            if f"{path}_s" in disk:
                entry[f"{path}_over_in_place"] = round(disk[f"{path}_s"] / max(entry["in_place_s"], 1e-9), 1)
                entry[f"{path}_over_first"] = round(disk[f"{path}_s"] / entry["first_in_place_s"], 1)
                entry[f"{path}_cpu_over_in_place_cpu"] = round(
                    disk[f"{path}_cpu_s"] / max(entry["in_place_cpu_s"], 1e-9), 1
                )
        result[op] = entry
        print(json.dumps({op: entry}), file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, action="append", help="model size in GB (repeatable)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="(repeatable; default both)")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated: " + ", ".join(OPS))
    parser.add_argument(
        "--expert-nonzero", type=float, default=NONZERO,
        help=f"share of entries each expert changes (default {NONZERO}; 1: dense, as a long fine-tune)",
    )  # fmt: skip
    parser.add_argument(
        "--candidates", type=int, default=3,
        help="steady-state candidates per op (default 3: a search that changes every layer fills the spare "
        "layer pool in its second)",
    )  # fmt: skip
    parser.add_argument(
        "--cache-gb", type=float, help="each memo's budget (workers.cache_gb; default: the worker's, by model size)"
    )
    # One thread, as a one-CPU worker slot: 2 threads on a busy 2-core box made elementwise ops 50x slower.
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process (default 1)")
    parser.add_argument("--round-trip-ops", help="ops whose candidates also make the disk round trips (all)")
    parser.add_argument("--no-mergekit", dest="mergekit", action="store_false", help="skip mergekit's path")
    parser.add_argument(
        "--dir", type=Path, default=Path("~/.cache/mergesearch/bench-models"), help="where models are kept"
    )
    args = parser.parse_args()
    args.dir = args.dir.expanduser()
    args.dir.mkdir(parents=True, exist_ok=True)
    disable_progress_bar()
    for size in args.size_gb or [1.0]:
        for dtype in args.dtype or ["float32", "bfloat16"]:
            print(json.dumps(bench(size, dtype, args)), flush=True)


if __name__ == "__main__":
    main()
