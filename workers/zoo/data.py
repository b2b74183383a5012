"""The zoo's synthetic tasks: copy, reverse, sort (lowercase strings) and two-digit addition.

Each task is a seeded generator of (prompt, target) pairs. Held-out dev and test prompts are drawn first, and
training samples are redrawn whenever they hit a held-out prompt, so the splits are disjoint from training
and from each other (two-digit addition has only 8100 distinct prompts, so this matters there).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = "abcdefghijklmnopqrstuvwxyz"
ALPHABET = LETTERS + "0123456789+=:"
MIN_LEN, MAX_LEN = 3, 10


@dataclass(frozen=True)
class ZooTask:
    """A synthetic task: how to make an example, the longest answer plus EOS (for generation), and its share of
    the base's training mix: copy and reverse are learnt in a sudden jump, so they get less, leaving the base
    moderately good at every task rather than perfect at two and poor at the others."""

    name: str
    make: Callable[[random.Random], tuple[str, str]]
    max_new_tokens: int
    base_weight: float


def _letters(rng: random.Random) -> str:
    return "".join(rng.choices(LETTERS, k=rng.randint(MIN_LEN, MAX_LEN)))


def _copy(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng)
    return f"copy:{s}=", s


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng)
    return f"rev:{s}=", s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng)
    return f"sort:{s}=", "".join(sorted(s))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"add:{a}+{b}=", str(a + b)


TASKS: dict[str, ZooTask] = {
    "copy": ZooTask("copy", _copy, MAX_LEN + 2, base_weight=0.7),
    "reverse": ZooTask("reverse", _reverse, MAX_LEN + 2, base_weight=0.7),
    "sort": ZooTask("sort", _sort, MAX_LEN + 2, base_weight=1.3),
    "add": ZooTask("add", _add, 5, base_weight=1.3),
}


def held_out_splits(task: ZooTask, n_dev: int, n_test: int, rng: random.Random) -> tuple[list, list]:
    """Distinct (prompt, target) pairs for dev and test, disjoint from each other."""
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n_dev + n_test:
        prompt, target = task.make(rng)
        if prompt not in seen:
            seen.add(prompt)
            pairs.append((prompt, target))
    return pairs[:n_dev], pairs[n_dev:]


def training_sample(task: ZooTask, held_out: set[str], rng: random.Random) -> tuple[str, str]:
    """One training pair that is in no held-out split."""
    while True:
        prompt, target = task.make(rng)
        if prompt not in held_out:
            return prompt, target
