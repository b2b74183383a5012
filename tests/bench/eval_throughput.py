"""Generation throughput of the HF backend on the zoo: generated tokens per second at batch sizes 1, 8, 32.

    python -m tests.bench.eval_throughput [--zoo DIR] [--examples N] [--threads N]

Greedy generation of the zoo base model on the dev prompts of every zoo task (N per task), with each task's
max_new_tokens and stop strings, exactly as a worker scores a candidate. A generated token is one the model
produced before EOS or a stop string (what a metric sees), so padding and finished rows do not count. Prints
one JSON line: tokens per second and seconds per batch size, and the setup (device, threads, prompts, tokens).
Without `--zoo`, the quick zoo is built (or reused) as the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluators.hf import HFBackend
from evaluators.tasks import load_task
from workers.zoo import TASKS, ZOO_VERSION, build_zoo

BATCH_SIZES = (1, 8, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--zoo", type=Path, help="a built zoo (default: the quick test zoo, built if missing)"
    )
    parser.add_argument("--examples", type=int, default=64, help="dev prompts per task")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a worker's CPU slot)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = args.zoo or Path(
        os.environ.get("MERGESEARCH_TEST_ZOO", f"~/.cache/mergesearch/test-zoo-{ZOO_VERSION}")
    )
    zoo = zoo.expanduser()
    if args.zoo is None:
        build_zoo(zoo, profile="quick")
    tokenizer = AutoTokenizer.from_pretrained(zoo / "base")
    model = AutoModelForCausalLM.from_pretrained(zoo / "base").to(args.device).eval()
    tasks = [
        load_task(name, zoo / "tasks" / name, max_new_tokens=TASKS[name].max_new_tokens)
        for name in sorted(p.name for p in (zoo / "tasks").iterdir())
    ]
    HFBackend(tokenizer, args.device, batch_size=8).generate(
        model, ["copy:abc="], max_new_tokens=4
    )  # warm up

    result: dict[str, dict[str, float]] = {"tokens_per_second": {}, "seconds": {}}
    for batch_size in BATCH_SIZES:
        backend = HFBackend(tokenizer, args.device, batch_size=batch_size)
        tokens, started = 0, time.perf_counter()
        for task in tasks:
            texts = backend.generate(
                model, [ex.prompt for ex in task.dev[: args.examples]], task.max_new_tokens, task.stop
            )
            tokens += sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        seconds = time.perf_counter() - started
        result["tokens_per_second"][str(batch_size)] = round(tokens / seconds, 1)
        result["seconds"][str(batch_size)] = round(seconds, 3)
    print(
        json.dumps(
            {
                **result,
                "generated_tokens": tokens,
                "prompts": sum(min(args.examples, len(t.dev)) for t in tasks),
                "tasks": [t.name for t in tasks],
                "device": args.device,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
