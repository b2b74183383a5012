"""Static merges of the zoo against its ideal: uniform average and task arithmetic, in plain torch.

Run: `python -m tests.bench.zoo_merges [ZOO_DIR]` (default: build or reuse the full zoo in ~/.mergesearch/zoo,
where `mergesearch zoo build` puts it). Prints one JSON line: per-merge mean test exact match and per task, next
to the zoo's ideal (per-task best expert), so a search's gain is measurable against the static merges; and the
evaluation cost of one candidate (every task on one 64-example dev chunk), the per-candidate cost of a search.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer, LlamaForCausalLM

from evaluators import HFBackend, chunk, load_task
from workers.zoo import build_zoo

LAMBDAS = (0.25, 0.5, 1.0)


def merged_state(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], scale: float | None) -> dict:
    """scale=None: uniform average of the experts; else base + scale * sum of task vectors."""
    if scale is None:
        return {k: sum(e[k] for e in experts) / len(experts) for k in base}
    return {k: base[k] + scale * sum(e[k] - base[k] for e in experts) for k in base}


def main() -> None:
    zoo = Path(sys.argv[1] if len(sys.argv) > 1 else "~/.mergesearch/zoo").expanduser()
    record = build_zoo(zoo, profile="full")
    names = record["experts"]
    tokenizer = AutoTokenizer.from_pretrained(zoo / "base")
    model = LlamaForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = [LlamaForCausalLM.from_pretrained(zoo / "experts" / n, dtype=torch.float32).state_dict() for n in names]
    tasks = {t["name"]: load_task(t["name"], zoo / t["path"], max_new_tokens=t["max_new_tokens"])
             for t in _job_tasks(zoo)}
    backend = HFBackend(tokenizer, batch_size=64)
    merges: dict[str, dict] = {}
    for label, scale in [("average", None), *((f"ta_{lam}", lam) for lam in LAMBDAS)]:
        model.load_state_dict(merged_state(base, experts, scale))
        per_task = {n: sum(backend.evaluate(model, t, t.test)) / len(t.test) for n, t in tasks.items()}
        merges[label] = {"mean": round(sum(per_task.values()) / len(per_task), 4),
                         "tasks": {n: round(v, 4) for n, v in per_task.items()}}
    model.load_state_dict(base)
    candidate_seconds = []
    for index in range(5):
        started = time.perf_counter()
        for task in tasks.values():
            backend.evaluate(model, task, chunk(task.dev, 64, index, seed=0))
        candidate_seconds.append(time.perf_counter() - started)
    print(json.dumps({
        "bench": "zoo_merges", "split": "test", "ideal_mean": round(record["ideal_mean"]["test"], 4),
        "base_mean": round(sum(s["test"] for s in record["scores"]["base"].values()) / len(names), 4),
        "merges": merges, "candidate_eval_seconds": round(sorted(candidate_seconds)[2], 3),
        "torch_threads": torch.get_num_threads(),
    }))


def _job_tasks(zoo: Path) -> list[dict]:
    return yaml.safe_load((zoo / "job.yaml").read_text())["tasks"]


if __name__ == "__main__":
    main()
