"""Build the model zoo: a tiny Llama base trained on a mix of tasks, and one short fine-tune per task.

What makes experts that merge (DESIGN.md, "Reference problem"): the base must already be moderately good at
every task, and each expert is a short, low learning-rate fine-tune from it, so that the experts are close in
weight space yet each clearly best on its own task. Experts trained from a base that cannot do the tasks learn
unrelated solutions that no merge can combine.

Every kernel runs single-threaded: on a shared CPU, OpenMP threads that spin for each other make a step ten times
slower, and one thread also makes the bytes reproducible. The experts are independent given the base, so they
train concurrently in Python threads, one per core (torch releases the GIL inside kernels); threads rather than
processes, because a spawned process re-imports the caller's unguarded `__main__`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from evaluators import HFBackend, Task, load_task
from workers.zoo.data import ALPHABET, TASKS, ZooTask, held_out_splits, training_sample
from workers.zoo.tokenizer import char_tokenizer

ZOO_VERSION = 6
Progress = Callable[[str, float], None]
Profile = Literal["full", "quick"]


@dataclass(frozen=True)
class ZooProfile:
    """How much training and held-out data a zoo gets."""

    base_steps: int
    base_lr: float
    base_batch: int
    expert_steps: int
    expert_lr: float
    expert_batch: int
    n_dev: int
    n_test: int


PROFILES: dict[str, ZooProfile] = {
    "full": ZooProfile(
        base_steps=600,
        base_lr=3e-3,
        base_batch=64,
        expert_steps=400,
        expert_lr=5e-4,
        expert_batch=32,
        n_dev=256,
        n_test=256,
    ),
    "quick": ZooProfile(
        base_steps=450,
        base_lr=3e-3,
        base_batch=64,
        expert_steps=300,
        expert_lr=1e-3,
        expert_batch=32,
        n_dev=128,
        n_test=128,
    ),
}
"""Version 6: the quick profile trains 450 base and 300 expert steps (was 300 and 200). With transformers 5.24
(December 2026) the old schedule left the quick base at 0.11 on copy and the add expert at 0.10 on its own
task, so experts were no longer clearly best on their tasks; the full profile was unaffected."""
WARMUP_STEPS = 30
BASE_SHARDS = 2
"""The base trains data-parallel over this many threads (experts train two at a time instead). Fixed rather
than the core count, because the split changes floating-point sums and so the bytes."""


class ZooError(ValueError):
    """A zoo that cannot be built as asked (unknown task, profile)."""


def model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The zoo architecture: 4 layers, hidden 128, as in DESIGN.md's reference measurements."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_zoo(
    out: Path,
    seed: int = 0,
    experts: Sequence[str] = ("copy", "reverse", "add", "sort"),
    profile: Profile = "full",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train (or reuse) the zoo in `out` and return its `zoo.json` record, including the score matrix."""
    out = Path(out).expanduser().resolve()
    experts = list(experts)
    unknown = [name for name in experts if name not in TASKS]
    if unknown or not experts or len(set(experts)) != len(experts):
        raise ZooError(f"experts: {unknown or experts} not a list of distinct zoo tasks ({', '.join(TASKS)})")
    if profile not in PROFILES:
        raise ZooError(f"profile '{profile}' is unknown (known: {', '.join(PROFILES)})")
    report = progress or (lambda message, fraction: None)
    key = {"version": ZOO_VERSION, "seed": seed, "profile": profile, "experts": experts}
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        cached = _cached_record(out, key)
        if cached is not None:
            report(f"zoo at {out} is up to date (cached, not retrained)", 1.0)
            return cached
        for stale in [*out.parent.glob(f".{out.name}.building-*"), *out.parent.glob(f".{out.name}.old-*")]:
            shutil.rmtree(
                stale, ignore_errors=True
            )  # left by a killed build; we hold the lock, so none is live
        staging = out.parent / f".{out.name}.building-{os.getpid()}"
        try:
            record = _build(staging, key, PROFILES[profile], report)
            _replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    report(f"zoo built in {record['build_seconds']:.0f}s at {out}", 1.0)
    return record


def _cached_record(out: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        record = json.loads((out / "zoo.json").read_text())
    except (OSError, ValueError):
        return None
    return record if all(record.get(k) == v for k, v in key.items()) else None


def _replace(staging: Path, out: Path) -> None:
    """Swap the finished build in by rename, so a killed build never leaves a complete-looking zoo."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _build(root: Path, key: dict[str, Any], profile: ZooProfile, report: Progress) -> dict[str, Any]:
    started, cpu_started = time.perf_counter(), time.process_time()
    seed, names = key["seed"], key["experts"]
    tokenizer = char_tokenizer(ALPHABET)
    held_out = _write_tasks(root / "tasks", [TASKS[n] for n in names], profile, seed)
    _write_job(root / "job.yaml", [TASKS[n] for n in names])
    tasks = [load_task(n, root / "tasks" / n, max_new_tokens=TASKS[n].max_new_tokens) for n in names]

    with _single_thread():
        report("training the base on a mix of all tasks", 0.0)
        torch.manual_seed(seed)
        base = LlamaForCausalLM(model_config(tokenizer))
        _train(
            base,
            tokenizer,
            [TASKS[n] for n in names],
            held_out,
            profile.base_steps,
            profile.base_lr,
            profile.base_batch,
            random.Random(f"{seed}:base"),
            shards=BASE_SHARDS,
            on_step=lambda step: report(
                f"base step {step}/{profile.base_steps}", 0.5 * step / profile.base_steps
            ),
        )
        _save(base, tokenizer, root / "base")

        report(f"fine-tuning {len(names)} experts", 0.5)

        cancel = threading.Event()

        def expert(name: str) -> tuple[LlamaForCausalLM, dict[str, dict[str, float]]]:
            model = copy.deepcopy(base)
            _train(
                model,
                tokenizer,
                [TASKS[name]],
                held_out,
                profile.expert_steps,
                profile.expert_lr,
                profile.expert_batch,
                random.Random(f"{seed}:{name}"),
                cancel=cancel,
            )
            return model, _score(model, tokenizer, tasks)

        scores: dict[str, dict[str, dict[str, float]]] = {}
        with ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as pool:
            futures = {pool.submit(lambda: (None, _score(base, tokenizer, tasks))): "base"}
            futures.update({pool.submit(expert, name): name for name in names})
            try:
                for done, future in enumerate(as_completed(futures), start=1):
                    name = futures[future]
                    model, scores[name] = future.result()
                    if model is not None:
                        _save(model, tokenizer, root / "experts" / name)
                    report(f"{name} trained and scored", 0.5 + 0.5 * done / len(futures))
            except BaseException:  # Ctrl-C or a failed expert: stop the other threads within one step
                cancel.set()
                pool.shutdown(cancel_futures=True)
                raise

    ideal = {t: {split: max(scores[e][t][split] for e in names) for split in ("dev", "test")} for t in names}
    record = {
        **key,
        "build_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "profile_settings": asdict(profile),
        "tasks": names,
        "scores": {model: scores[model] for model in ["base", *names]},
        "ideal": ideal,
        "ideal_mean": {
            split: round(sum(ideal[t][split] for t in names) / len(names), 4) for split in ("dev", "test")
        },
    }
    (root / "zoo.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _score(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, tasks: list[Task]
) -> dict[str, dict[str, float]]:
    """Exact match per task on dev and test, through the same evaluator a search uses."""
    backend = HFBackend(tokenizer, batch_size=128)
    return {
        task.name: {
            "dev": _mean(backend.evaluate(model, task, task.dev)),
            "test": _mean(backend.evaluate(model, task, task.test)),
        }
        for task in tasks
    }


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4)


def _train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    tasks: list[ZooTask],
    held_out: set[str],
    steps: int,
    lr: float,
    batch_size: int,
    rng: random.Random,
    shards: int = 1,
    on_step: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """AdamW with warmup and cosine decay to 10%; the loss covers only the answer and EOS.

    With `shards` > 1 each batch is split across that many threads, whose gradients are summed in a fixed order:
    data parallelism on one model that uses every core yet gives the same bytes on any machine.
    """
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / WARMUP_STEPS) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))),
    )
    model.train()
    with ThreadPoolExecutor(max_workers=shards) as pool:
        for step, batch in enumerate(_batches(tokenizer, tasks, held_out, batch_size, steps, rng), start=1):
            if cancel is not None and cancel.is_set():
                raise ZooError("zoo build cancelled")
            shard_grads = pool.map(partial(_shard_grads, model, params, batch, shards), range(shards))
            for param, *grads in zip(params, *shard_grads):
                param.grad = torch.stack(grads).sum(0)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            if on_step is not None and step % 50 == 0:
                on_step(step)
    model.eval()


def _shard_grads(
    model: LlamaForCausalLM,
    params: list[torch.nn.Parameter],
    batch: tuple[torch.Tensor, ...],
    shards: int,
    k: int,
) -> tuple[torch.Tensor, ...]:
    """Gradients from rows k, k + shards, ... of the batch, each scaled as a part of the whole batch's mean."""
    input_ids, attention, labels = batch
    rows = slice(k, None, shards)
    loss = model(
        input_ids=input_ids[rows],
        attention_mask=attention[rows],
        labels=labels[rows],
        num_items_in_batch=int((labels != -100).sum()),
    ).loss
    return torch.autograd.grad(loss, params)


def _batches(
    tokenizer: PreTrainedTokenizerFast,
    tasks: list[ZooTask],
    held_out: set[str],
    batch_size: int,
    steps: int,
    rng: random.Random,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded batches of `<s>prompt answer</s>`, tasks drawn by `base_weight`, labels -100 outside the answer."""
    eos = tokenizer.eos_token_id
    for _ in range(steps):
        drawn = rng.choices(tasks, weights=[task.base_weight for task in tasks], k=batch_size)
        pairs = [training_sample(task, held_out, rng) for task in drawn]
        prompts = tokenizer([p for p, _ in pairs])["input_ids"]
        answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
        width = max(len(p) + len(a) + 1 for p, a in zip(prompts, answers))
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        attention = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            row = prompt + answer + [eos]
            input_ids[i, : len(row)] = torch.tensor(row)
            labels[i, len(prompt) : len(row)] = torch.tensor(answer + [eos])
            attention[i, : len(row)] = 1
        yield input_ids, attention, labels


def _write_tasks(folder: Path, tasks: list[ZooTask], profile: ZooProfile, seed: int) -> set[str]:
    """Write each task's dev/test JSONL; return every held-out prompt, which training must never see."""
    held_out: set[str] = set()
    for task in tasks:
        dev, test = held_out_splits(
            task, profile.n_dev, profile.n_test, random.Random(f"{seed}:{task.name}:eval")
        )
        (folder / task.name).mkdir(parents=True)
        for split, pairs in (("dev", dev), ("test", test)):
            lines = [json.dumps({"prompt": p, "target": t}) for p, t in pairs]
            (folder / task.name / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        held_out.update(p for p, _ in dev + test)
    return held_out


def _write_job(path: Path, tasks: list[ZooTask]) -> None:
    """The ready-to-run job file; paths are relative to its folder."""
    experts = ", ".join(f"{t.name}: experts/{t.name}" for t in tasks)
    task_lines = "".join(
        f"  - {{name: {t.name}, path: tasks/{t.name}, metric: exact_match, max_new_tokens: {t.max_new_tokens}}}\n"
        for t in tasks
    )
    path.write_text(
        "name: zoo\n"
        "models:\n"
        "  base: base\n"
        f"  experts: {{{experts}}}\n"
        "tasks:\n"
        f"{task_lines}"
        "evaluation: {backend: hf, device: cpu, dev_subset: 64, batch_size: 64, seed: 0}\n"
        "search: {strategy: random, budget: 16, seed: 0}\n"
        "workers: {count: 2}\n"
    )


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """save_pretrained without its one-shard progress bar, which would tear the caller's progress display."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def _single_thread() -> Iterator[None]:
    """One intra-op thread and deterministic kernels while training: fast on a shared CPU, same bytes."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
