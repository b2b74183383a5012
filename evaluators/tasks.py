"""Task data: JSONL dev/test splits, loaded strictly, and the seeded chunks a search scores candidates on.

A task is two JSONL files, `dev.jsonl` (what the search optimises) and `test.jsonl` (reported only). A line is
either `{"prompt", "target"}` (generation, scored by a metric on the generated text) or
`{"prompt", "choices", "label"}` (choice, scored by log-likelihood). Bad data is refused with `FILE:LINE`, so
a user can fix the exact line instead of meeting a confusing score of zero later. For instruct models a task
can be given few-shot examples from its dev split and the tokenizer's chat template (`format_prompts`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from evaluators.metrics import check_metric

TaskKind = Literal["generate", "choice"]
FEWSHOT_DELIMITER = "\n\n"
"""Between solved examples in a plain-text few-shot prompt (lm-eval's `fewshot_delimiter`)."""


class TaskDataError(ValueError):
    """Task data that cannot be used; the message is `FILE:LINE: what is wrong` (or `FILE: ...`)."""


@dataclass(frozen=True)
class Example:
    """One example; `id` is its 0-based position in its split, stable as long as the file is."""

    id: int
    prompt: str
    target: str | None = None
    choices: tuple[str, ...] | None = None
    label: int | None = None

    @property
    def kind(self) -> TaskKind:
        return "choice" if self.choices is not None else "generate"


@dataclass
class Task:
    """A loaded task. `metric` names an entry of `evaluators.metrics.METRICS` or is `regex:PATTERN`."""

    name: str
    kind: TaskKind
    dev: list[Example]
    test: list[Example]
    metric: str = "exact_match"
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)


def load_task(
    name: str,
    path: Path,
    metric: str | None = None,
    max_new_tokens: int | None = None,
    stop: tuple[str, ...] | None = None,
    num_fewshot: int = 0,
    chat_tokenizer: Any | None = None,
    seed: int = 0,
) -> Task:
    """Read `path/dev.jsonl` and `path/test.jsonl`; the metric defaults to the kind's natural one.

    With `num_fewshot` or `chat_tokenizer` every prompt is formatted once, here (`format_prompts`).
    """
    path = Path(path)
    dev, dev_kind = _read_split(path / "dev.jsonl")
    test, test_kind = _read_split(path / "test.jsonl")
    if dev_kind != test_kind:
        raise TaskDataError(
            f"{path / 'test.jsonl'}:1: {test_kind} examples, but {path / 'dev.jsonl'} has {dev_kind} examples"
        )
    metric = metric or ("choice_accuracy" if dev_kind == "choice" else "exact_match")
    try:
        check_metric(metric, dev_kind)
    except ValueError as exc:
        raise TaskDataError(f"{path}: task '{name}': {exc}") from None
    if max_new_tokens is not None and max_new_tokens < 1:
        raise TaskDataError(f"{path}: task '{name}': max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_fewshot or chat_tokenizer is not None:
        try:
            test = format_prompts(test, dev, num_fewshot, chat_tokenizer, seed, split="test")
            dev = format_prompts(dev, dev, num_fewshot, chat_tokenizer, seed, split="dev")
        except ValueError as exc:
            raise TaskDataError(f"{path}: task '{name}': {exc}") from None
    task = Task(name=name, kind=dev_kind, dev=dev, test=test, metric=metric)
    if max_new_tokens is not None:
        task.max_new_tokens = max_new_tokens
    if stop is not None:
        task.stop = tuple(stop)
    return task


def format_prompts(
    examples: list[Example],
    dev: list[Example],
    num_fewshot: int,
    chat_tokenizer: Any | None,
    seed: int,
    split: Literal["dev", "test"],
) -> list[Example]:
    """`examples` with prompts preceded by `num_fewshot` solved dev examples and, given a tokenizer, wrapped in
    its chat template (each shot a user and an assistant turn, then the prompt with the generation prompt).

    Shots are drawn per example from a generator seeded by (seed, split, example id), never the dev example
    being scored, so a prompt is the same on every worker and in every chunk. Without a chat template shots are written as
    prompt + answer, separated by a blank line (lm-eval's default). An example's id is kept.
    """
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if num_fewshot >= len(dev):
        raise ValueError(
            f"num_fewshot {num_fewshot} needs more than {num_fewshot} dev examples, got {len(dev)}"
        )
    if chat_tokenizer is not None and not getattr(chat_tokenizer, "chat_template", None):
        raise ValueError("chat_template is set, but the base model's tokenizer has no chat template")
    return [
        replace(ex, prompt=_prompt(ex, _shots(ex, split, dev, num_fewshot, seed), chat_tokenizer))
        for ex in examples
    ]


def _shots(example: Example, split: str, dev: list[Example], k: int, seed: int) -> list[Example]:
    """k seeded dev examples other than `example` (one spare is drawn in case it is among them)."""
    if k == 0:
        return []
    rng = random.Random(f"{seed}:{split}:{example.id}")
    drawn = [dev[i] for i in rng.sample(range(len(dev)), min(k + 1, len(dev)))]
    return [shot for shot in drawn if not (split == "dev" and shot.id == example.id)][:k]


def _answer(example: Example) -> str:
    return example.choices[example.label] if example.choices is not None else example.target  # type: ignore[index,return-value]


def _prompt(example: Example, shots: list[Example], chat_tokenizer: Any | None) -> str:
    if chat_tokenizer is None:
        return "".join(shot.prompt + _answer(shot) + FEWSHOT_DELIMITER for shot in shots) + example.prompt
    turns = [
        turn
        for shot in shots
        for turn in (
            {"role": "user", "content": shot.prompt},
            {"role": "assistant", "content": _answer(shot)},
        )
    ]
    text = chat_tokenizer.apply_chat_template(
        [*turns, {"role": "user", "content": example.prompt}], tokenize=False, add_generation_prompt=True
    )
    # The backends tokenize prompts with the tokenizer's special tokens: a template's own BOS would be doubled.
    bos = chat_tokenizer.bos_token
    if bos and text.startswith(bos) and chat_tokenizer("")["input_ids"][:1] == [chat_tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def _read_split(file: Path) -> tuple[list[Example], TaskKind]:
    """Parse one JSONL split; all lines must be of one kind. Blank lines are skipped."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TaskDataError(f"{file}: file not found") from None
    except UnicodeDecodeError as exc:
        raise TaskDataError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    examples: list[Example] = []
    kind: TaskKind | None = None
    first_line = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        example = _parse_example(file, number, line, len(examples))
        if kind is None:
            kind, first_line = example.kind, number
        elif example.kind != kind:
            raise TaskDataError(
                f"{file}:{number}: a {example.kind} example, but line {first_line} is a {kind} example"
            )
        examples.append(example)
    if kind is None:
        raise TaskDataError(f"{file}: no examples (empty file)")
    return examples, kind


def _parse_example(file: Path, number: int, line: str, index: int) -> Example:
    where = f"{file}:{number}"
    try:
        row: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt = _field(row, "prompt", str, where)
    if "choices" not in row and "label" not in row:
        return Example(id=index, prompt=prompt, target=_field(row, "target", str, where))
    choices = _field(row, "choices", list, where)
    label = _field(row, "label", int, where)
    if not choices or not all(isinstance(c, str) for c in choices):
        raise TaskDataError(f"{where}: field 'choices' must be a non-empty list of strings")
    if isinstance(label, bool) or not 0 <= label < len(choices):
        raise TaskDataError(f"{where}: field 'label' is {label}, outside the {len(choices)} choices")
    return Example(id=index, prompt=prompt, choices=tuple(choices), label=label)


def _field(row: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in row:
        raise TaskDataError(f"{where}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TaskDataError(f"{where}: field '{key}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def num_chunks(n_examples: int, size: int) -> int:
    """How many chunks cover a split once (the last one wraps to the start to stay full)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return max(1, math.ceil(n_examples / size))


def chunk(examples: list[Example], size: int, index: int, seed: int) -> list[Example]:
    """The `index`-th run of `size` consecutive examples of a seeded shuffle, wrapping; -1 means all.

    Chunks are read from the shuffled split as an endless stream (as RMM's restarting data iterator does),
    so every chunk has exactly min(size, n) distinct examples and index k + num_chunks continues the stream.
    """
    if index == -1:
        return list(examples)
    if index < 0:
        raise ValueError(f"chunk index must be >= 0 or -1 (all), got {index}")
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    order = list(examples)
    random.Random(seed).shuffle(order)
    n = len(order)
    if n == 0 or size >= n:
        return order
    start = (index * size) % n
    return [order[(start + i) % n] for i in range(size)]
