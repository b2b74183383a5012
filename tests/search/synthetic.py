"""A synthetic merge problem and a driver loop, so strategies can be tested in milliseconds without models.

`SyntheticWorker` stands in for a worker: it reads each layer's effective expert coefficients off the recipe
(the weights of `task_arithmetic` / `ties` / `magnitude_prune`, dense + sparse of `dare_affine`) and scores
them against per-task, per-layer ideal coefficients. Each task prefers its own expert, as real experts do, so
the best merge is a layer-dependent compromise. Per-example scores are soft thresholds of the task's skill,
which gives M2N2's fitness sharing real per-example structure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from search.base import Candidate, Result, StrategyBase
from search.space import SearchSpace, SpaceSpec


def make_space(op: str = "ties", layers: int = 4, experts: int = 3, **spec: Any) -> SearchSpace:
    """The job's space, per layer with weights in [0, 1] unless `spec` says otherwise (the tests' problem)."""
    spec = {"granularity": "layer", "weight_range": (0.0, 1.0), **spec}
    return SearchSpace(SpaceSpec(op=op, **spec), layers, "base", [f"e{i}" for i in range(experts)], seed=7)


def coefficients(recipe: dict[str, Any]) -> np.ndarray:
    """Each layer's effective expert coefficients (layers × K), as the merged task vector weighs them."""
    experts = recipe["models"]["experts"]
    rows = []
    for layer in recipe["layers"]:
        p = layer["params"]
        if "dense" in p:
            rows.append(np.add(p["dense"], p["sparse"]))
        elif layer["op"] == "copy":
            rows.append(np.array([float(p["model"] == e) for e in experts]))
        else:
            w = np.asarray(p["weights"], dtype=float)
            normalize = p.get("normalize", layer["op"] == "linear")
            rows.append((w / w.sum() if normalize else w) * p.get("lambda", 1.0))
    return np.array(rows)


def recipe_sparsity(recipe: dict[str, Any]) -> float:
    densities = [layer["params"].get("density", 1.0) for layer in recipe["layers"]]
    return float(1.0 - np.mean(densities))


class QuadraticWorker:
    """A smooth bowl over the coefficients, 1 − mean_l ‖c_l − c*_l‖², with c* ~ U[0.1, 0.9] per layer."""

    def __init__(self, layers: int, experts: int, seed: int = 0) -> None:
        self.target = np.random.default_rng(seed).uniform(0.1, 0.9, (layers, experts))

    def __call__(self, candidate: Candidate) -> Result:
        c = coefficients(candidate.recipe)
        return Result(candidate.number, float(1 - ((c - self.target) ** 2).sum(1).mean()))


class SyntheticWorker:
    """Scores recipes from their per-layer coefficients; `fail_every` fails every n-th candidate number.

    By default there is one task per expert, each preferring its own expert with a layer-dependent mix of the
    others; `targets` (tasks × experts) sets each task's ideal coefficients instead, the same in every layer.
    """

    def __init__(
        self,
        layers: int,
        experts: int,
        examples: int = 24,
        seed: int = 0,
        fail_every: int = 0,
        targets: np.ndarray | None = None,
    ) -> None:
        rng = np.random.default_rng(seed)
        mix = rng.dirichlet(np.ones(experts), (experts, layers))
        self.targets = 0.6 * np.eye(experts)[:, None, :] + 0.4 * mix  # task t prefers expert t
        if targets is not None:
            self.targets = np.repeat(np.asarray(targets, float)[:, None, :], layers, axis=1)
        tasks = len(self.targets)
        self.importance = rng.dirichlet(np.full(layers, 0.5), tasks)  # which layers each task relies on
        self.thresholds = rng.uniform(0.3, 0.9, (tasks, examples))
        self.fail_every = fail_every

    def __call__(self, candidate: Candidate) -> Result:
        if self.fail_every and candidate.number % self.fail_every == self.fail_every - 1:
            return Result(candidate.number, math.nan, failed=True, error="synthetic failure")
        c = coefficients(candidate.recipe)
        sparsity = recipe_sparsity(candidate.recipe)
        distance = (((c[None] - self.targets) ** 2).sum(-1) * self.importance).sum(-1)
        skill = np.exp(-distance) * (1 - 0.25 * sparsity**2)
        per_example = 1 / (1 + np.exp(-(skill[:, None] - self.thresholds) / 0.05))
        tasks = [f"t{i}" for i in range(len(per_example))]
        return Result(
            candidate.number,
            float(per_example.mean()),
            scores={t: float(row.mean()) for t, row in zip(tasks, per_example)},
            per_example={t: row.tolist() for t, row in zip(tasks, per_example)},
            sparsity=sparsity,
        )


class Loop:
    """A deterministic driver: ask up to `batch`, then tell up to `batch` pending results in reverse order.

    `pending` plays the archive's part on resume: it survives a swap of the strategy instance.
    """

    def __init__(self, strategy: StrategyBase, worker: Callable[[Candidate], Result], batch: int = 5) -> None:
        self.strategy, self.worker, self.batch = strategy, worker, batch
        self.pending: list[Candidate] = []
        self.asked: list[Candidate] = []
        self.results: list[Result] = []

    def step(self) -> None:
        new = self.strategy.ask(self.batch)
        assert len(new) <= self.batch
        self.asked += new
        self.pending += new
        if not self.pending:
            raise AssertionError("strategy asked for nothing while not done")
        told, self.pending = self.pending[: self.batch], self.pending[self.batch :]
        results = [self.worker(c) for c in reversed(told)]
        self.results += results
        self.strategy.tell(results)

    def run(self, max_told: int | None = None) -> Loop:
        while not self.strategy.done() and (max_told is None or self.strategy.told < max_told):
            self.step()
        return self

    def best(self) -> float:
        return max((r.fitness for r in self.results if not r.failed), default=-math.inf)


def resumed_run(
    make: Callable[[], StrategyBase], worker: Callable[[Candidate], Result], stop_after: int, batch: int = 5
) -> Loop:
    """Run until `stop_after` tells, checkpoint through JSON into a fresh instance, and finish the run."""
    loop = Loop(make(), worker, batch).run(max_told=stop_after)
    state = json.loads(json.dumps(loop.strategy.state_dict(), allow_nan=False))
    fresh = make()
    fresh.load_state_dict(state)
    loop.strategy = fresh
    return loop.run()


def trajectory(loop: Loop) -> list[dict[str, Any]]:
    return [json.loads(json.dumps(c.to_json())) for c in loop.asked]
