"""What one candidate costs: materialize in place + evaluate, against a disk round trip (write + reload).

    python -m tests.bench.candidate_cost [--zoo DIR] [--candidates N] [--examples N]

Candidates are random search-like recipes per op (TIES and task arithmetic with random per-layer weights; RMM-
like stacks of copied layers). Prints one JSON line: per op, the mean seconds to materialize in place and to
`write_merged` + `from_pretrained` the same recipe, `speedup` = disk round trip / in place (target >= 5); and
the mean seconds to evaluate a candidate on every task.

Without `--zoo`, the zoo is built with `workers.zoo.build_zoo(profile="quick")` when that exists, else a
synthetic stand-in (untrained 4-layer, hidden-128 Llama, three perturbed experts, the zoo's four tasks) is
used: its scores are meaningless, but its costs are the zoo's.
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
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from evaluators.hf import HFBackend
from evaluators.tasks import Example, Task
from workers.materialize import ResidentModel, write_merged
from workers.recipe import Recipe
from workers.sources import Sources
from workers.zoo.tokenizer import char_tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789+=:"
LETTERS = ALPHABET[:26]


def synthetic_zoo(root: Path, n_experts: int = 3) -> tuple[Path, dict[str, Path], list[Task]]:
    """A zoo-shaped stand-in: the zoo's architecture and prompts, untrained weights."""
    config = LlamaConfig(
        vocab_size=4 + len(ALPHABET),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    char_tokenizer(ALPHABET).save_pretrained(root / "base")
    experts = {}
    for i in range(n_experts):
        with torch.no_grad():
            for p in base.parameters():
                p.add_(torch.randn_like(p), alpha=0.01)
        experts[f"expert{i}"] = root / f"expert{i}"
        base.save_pretrained(experts[f"expert{i}"])
    rng = random.Random(0)
    makers = {
        "copy": lambda s: (f"copy:{s}=", s),
        "reverse": lambda s: (f"rev:{s}=", s[::-1]),
        "sort": lambda s: (f"sort:{s}=", "".join(sorted(s))),
    }
    tasks = []
    for name, make in makers.items():
        pairs = [make("".join(rng.choices(LETTERS, k=rng.randint(3, 10)))) for _ in range(64)]
        dev = [Example(id=i, prompt=p, target=t) for i, (p, t) in enumerate(pairs)]
        tasks.append(Task(name=name, kind="generate", dev=dev, test=[], max_new_tokens=12, stop=()))
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(64)]
    dev = [Example(id=i, prompt=f"add:{a}+{b}=", target=str(a + b)) for i, (a, b) in enumerate(pairs)]
    tasks.append(Task(name="add", kind="generate", dev=dev, test=[], max_new_tokens=5, stop=()))
    return root / "base", experts, tasks


def random_recipe(rng: random.Random, op: str, experts: list[str], n_layers: int) -> Recipe:
    """A search-like candidate: TIES or task arithmetic with random per-layer weights, or an RMM-like stack of
    whole layers copied from random models and source depths (skips and repeats included)."""
    models = ["base", *experts]

    def spec() -> dict:
        weights = [round(rng.uniform(0.1, 1.0), 3) for _ in experts]
        if op == "ties":
            return {"op": op, "params": {"weights": weights, "density": round(rng.uniform(0.1, 0.9), 3)}}
        if op == "copy":
            return {"op": op, "params": {"model": rng.choice(models)}}
        return {"op": op, "params": {"weights": weights}}

    froms = sorted(rng.choices(range(n_layers), k=n_layers)) if op == "copy" else range(n_layers)
    return Recipe.parse(
        {
            "models": {"base": "base", "experts": experts},
            "layers": [{"from": i, **spec()} for i in froms],
            "rest": spec() if op != "copy" else {"op": "copy", "params": {"model": "base"}},
            "seed": rng.randrange(2**31),
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
    """Per op: mean in-place materialize and disk round trip, interleaved candidate by candidate so that load
    from the other users of the machine hits both alike; evaluation (independent of the op) on the first op."""
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
        for i in range(n_candidates):
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
        result[op] = {
            "materialize_in_place_s": round(mean(in_place), 5),
            "disk_round_trip_s": round(mean(round_trip), 5),
            "speedup": round(mean(round_trip) / mean(in_place), 2),
            "layer_cache_hits": hits,
        }
    result["evaluate_s"] = round(mean(evaluate), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, help="a built zoo folder (default: build one in a temp folder)")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--examples", type=int, default=16, help="dev examples per task per candidate")
    parser.add_argument("--ops", default="ties,task_arithmetic,copy", help="comma-separated merge ops")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="candidate_cost-") as tmp:
        scratch = Path(tmp)
        base, experts, tasks = synthetic_zoo(scratch / "zoo")
        ops = args.ops.split(",")
        result = measure(base, experts, tasks, ops, args.candidates, args.examples, scratch)
        result["zoo"] = "synthetic"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
