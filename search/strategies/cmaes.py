"""CMA-ES over the space's genome, the mergekit-evolve baseline (ALGORITHMS.md §7) with the product changes.

x0 is the best reference the space can express (`warm_start`: typically the best static merge or the
base, whose score is reused, not re-evaluated), else the space's center; sigma0 a fraction (1/6) of each
gene's range (cma's `CMA_stds` carries the per-gene ranges), popsize 4 + ⌊3 ln D⌋, real bounds (cma's BoundTransform) instead of |x| folding, fitness
maximised (cma minimises −fitness). The normal draws come from our own seeded Generator through cma's
`randn` option, so numpy's global state is never touched. Generations are synchronous (barrier): cma's
`tell` needs the whole population; a failed candidate gets the worst finite fitness of its generation.

The checkpoint is data: the fitness values told to cma, generation by generation. cma has no public state
export, and a pickled optimizer would make every archive row code that loading runs; instead loading builds
the optimizer afresh from the seed and replays ask/tell with those values, which re-draws the same
populations from the same seeded stream and so reaches the exact same state (popsize floats per generation,
instead of the covariance's D² floats; a replay costs what the generations cost cma the first time).

cma's linear algebra (the D × D covariance's eigendecomposition) runs on one BLAS thread. OpenBLAS's own
threads, one per core by default, made it about 15 times slower in CPU time on a busy 2-core host, where the
driver shares the cores with workers: at D = 256, popsize 20, replaying 200 generations took 17 CPU s (52 s
wall) with two threads and 1 CPU s with one (`python -m tests.bench.cmaes_resume`). One thread also gives the
same floating-point operations in the run and in its replay, whatever host each runs on.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import cma
import numpy as np
from pydantic import Field
from threadpoolctl import ThreadpoolController

from search.base import (
    Candidate,
    GenerationalStrategy,
    Reference,
    Result,
    StrategyParams,
    effective_fitness,
    expressible,
    register,
    seeded_generators,
)
from search.space import SearchSpace


class CMAESParams(StrategyParams):
    sigma0: float = Field(1 / 6, gt=0)
    """Initial step size as a fraction of each gene's range."""
    popsize: int | None = Field(None, ge=2, le=4096)
    """None = 4 + ⌊3 ln D⌋ (cma's default); each generation is popsize × D floats in the driver."""


class NormalDraws:
    """cma's `randn(lam, n)` backed by a numpy Generator: seeded, so a replay re-draws the same numbers."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def __call__(self, lam: int, n: int) -> np.ndarray:
        return self.rng.standard_normal((lam, n))


BLAS = ThreadpoolController()
ONE_THREAD = threading.Lock()
"""BLAS thread limits are per process: drivers in one service (threads) take turns inside `one_blas_thread`,
so that one's exit cannot lift the limit while another computes."""


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run cma's linear algebra on one BLAS thread (see the module docstring)."""
    with ONE_THREAD, BLAS.limit(limits=1, user_api="blas"):
        yield


@register
class CMAES(GenerationalStrategy):
    name = "cmaes"
    Params = CMAESParams
    params: CMAESParams

    def __init__(self, space: SearchSpace, budget: int, seed: int, params: CMAESParams) -> None:
        super().__init__(space, budget, seed, params)
        self.popsize = params.popsize or 4 + int(3 * math.log(space.dim))
        self.x0 = space.center()
        """The mean of the first generation: the space's center, or the best reference (`warm_start`)."""
        self.es = self._optimizer()
        self.told_fitness: list[list[float]] = []
        """What `learn` told cma, per generation: the checkpoint, with `x0`."""

    def _optimizer(self) -> cma.CMAEvolutionStrategy:
        (rng,) = seeded_generators(self.seed, 1)
        lo, hi = self.space.bounds()
        options = {
            "popsize": self.popsize,
            "bounds": [lo, hi],
            "CMA_stds": [b - a for a, b in zip(lo, hi)],
            "randn": NormalDraws(rng),
            "seed": math.nan,  # "do nothing": cma would otherwise reseed numpy's global generator
            "verbose": -9,
        }
        return cma.CMAEvolutionStrategy(self.x0, self.params.sigma0, options)

    def warm_start(self, references: list[Reference]) -> None:
        """Centre the search on the best reference the genome can express."""
        for _, coefficients in expressible(references, self.space):
            if (genome := self.space.genome_of(coefficients)) is not None:
                self.x0 = genome
                self.es = self._optimizer()
                return

    def breed(self, first_number: int) -> list[Candidate]:
        with one_blas_thread():
            genomes = [x.tolist() for x in self.es.ask()]
        return [
            Candidate(first_number + i, g, self.space.decode(g), generation=self.generation)
            for i, g in enumerate(genomes)
        ]

    def learn(self, population: list[Candidate], results: list[Result]) -> None:
        fitness = effective_fitness(results)
        with one_blas_thread():
            self.es.tell([np.array(c.genome) for c in population], [-f for f in fitness])
        self.told_fitness.append(fitness)

    def strategy_state(self) -> dict[str, Any]:
        return {"x0": self.x0, "told_fitness": self.told_fitness}

    def load_strategy_state(self, state: dict[str, Any]) -> None:
        if "told_fitness" not in state:
            raise ValueError("cmaes: a checkpoint without 'told_fitness' (an older pickled one) is not loaded")
        self.x0 = [float(x) for x in state.get("x0", self.space.center())]
        self.es = self._optimizer()
        self.told_fitness = [[float(f) for f in generation] for generation in state["told_fitness"]]
        with one_blas_thread():
            for fitness in self.told_fitness:
                self.es.tell(self.es.ask(), [-f for f in fitness])
