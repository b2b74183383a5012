"""Generation throughput of the HF backend on the zoo, against plain `model.generate` on the same prompts:
generated tokens per second at batch sizes 1, 8, 32.

    python -m tests.bench.eval_throughput [--zoo DIR] [--examples N] [--threads N]

Greedy generation of the zoo base model on the dev prompts of every zoo task (N per task), with each task's
max_new_tokens and stop strings, exactly as a worker scores a candidate. `transformers` is `model.generate`
(greedy, KV cache, EOS, a per-row stop-string criterion) on the same prompts in the same batches, left-padded in prompt order.
A generated token is one the model produced before EOS or a stop string (what a metric sees), counted the
same way for both, so padding and finished rows do not count. Prints one JSON line: tokens per second and
seconds per batch size for both, `ratio` = ours / transformers, and the setup. Without `--zoo`, the quick
zoo is built (or reused) as the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from evaluators.hf import HFBackend
from evaluators.tasks import Task, load_task
from workers.zoo import TASKS, ZOO_VERSION, build_zoo

BATCH_SIZES = (1, 8, 32)

Generate = Callable[[list[str], int, tuple[str, ...]], list[str]]


def with_transformers(model: Any, tokenizer: Any, batch_size: int, device: str) -> Generate:
    """`model.generate` in batches of `batch_size` (prompt order, left padding), cut at the first stop string."""
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(prompts: list[str], max_new_tokens: int, stop: tuple[str, ...]) -> list[str]:
        texts = []
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(
                device
            )
            with torch.inference_mode():
                width = batch["input_ids"].shape[1]
                out = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                    stopping_criteria=StoppingCriteriaList([StopStrings(tokenizer, stop, width)] if stop else []),
                )  # fmt: skip
            new = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            texts += [cut(text, stop) for text in new]
        return texts

    return generate


class StopStrings(StoppingCriteria):
    """Per-row stop on the task's stop strings, decoding only the last few generated tokens as the backend
    does (transformers' `stop_strings` needs every stop character in the vocabulary; the zoo's is
    character-level without a newline token)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_width: int) -> None:
        self.tokenizer, self.stop, self.prompt_width = tokenizer, stop, prompt_width
        self.tail = max(len(s) for s in stop) + 1

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        start = max(self.prompt_width, input_ids.shape[1] - self.tail)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        done = [any(s in text for s in self.stop) for text in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut(text: str, stop: Sequence[str]) -> str:
    end = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:end]


def timed(
    paths: dict[str, Generate], tokenizer: Any, tasks: list[Task], examples: int
) -> dict[str, list[float]]:
    """Per path: [generated tokens, seconds] over every task's first `examples` dev prompts, the paths taking
    turns task by task so that the machine's other load hits them alike."""
    totals = {name: [0.0, 0.0] for name in paths}
    for task in tasks:
        prompts = [ex.prompt for ex in task.dev[:examples]]
        for name, generate in paths.items():
            started = time.perf_counter()
            texts = generate(prompts, task.max_new_tokens, task.stop)
            totals[name][1] += time.perf_counter() - started
            totals[name][0] += sum(
                len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
            )
    return totals


def measure(
    model: Any, tokenizer: Any, tasks: list[Task], examples: int, device: str, batch_sizes: Sequence[int]
) -> dict:
    """Tokens per second of both paths at each batch size (each path warmed up once first)."""
    result: dict[str, Any] = {"bench": "eval_throughput", "tokens_per_second": {}, "seconds": {}}
    result |= {"transformers_tokens_per_second": {}, "ratio": {}}
    HFBackend(tokenizer, device).generate(model, [tasks[0].dev[0].prompt], max_new_tokens=4)
    with_transformers(model, tokenizer, 1, device)([tasks[0].dev[0].prompt], 4, ())
    for batch_size in batch_sizes:
        backend = HFBackend(tokenizer, device, batch_size=batch_size)

        def ours(prompts: list[str], max_new_tokens: int, stop: tuple[str, ...]) -> list[str]:
            return backend.generate(model, prompts, max_new_tokens, stop)  # noqa: B023 (called at once)

        paths = {"ours": ours, "transformers": with_transformers(model, tokenizer, batch_size, device)}
        totals = timed(paths, tokenizer, tasks, examples)
        (tokens, seconds), (theirs, their_seconds) = totals["ours"], totals["transformers"]
        key = str(batch_size)
        result["tokens_per_second"][key] = round(tokens / seconds, 1)
        result["seconds"][key] = round(seconds, 3)
        result["transformers_tokens_per_second"][key] = round(theirs / their_seconds, 1)
        result["ratio"][key] = round(tokens / seconds / (theirs / their_seconds), 2)
    return result | {
        "generated_tokens": int(tokens),
        "transformers_generated_tokens": int(theirs),
        "prompts": sum(min(examples, len(t.dev)) for t in tasks),
        "tasks": [t.name for t in tasks],
        "device": device,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }


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
    print(json.dumps(measure(model, tokenizer, tasks, args.examples, args.device, BATCH_SIZES)))


if __name__ == "__main__":
    main()
