"""CMA-ES over the space's genome, the mergekit-evolve baseline (ALGORITHMS.md §7) with the product changes.

x0 is the best reference the space can express (`warm_start`: typically the best static merge or the base,
whose score is reused, not re-evaluated), else the space's center; sigma0 a fraction (1/6) of each gene's range (cma's `CMA_stds` carries the
per-gene ranges), popsize 4 + ⌊3 ln D⌋, real bounds (cma's BoundTransform) instead of |x| folding, fitness
maximised (cma minimises −fitness). The normal draws come from our own seeded Generator through cma's
`randn` option, so numpy's global state is never touched and the draws travel with the pickled optimizer.
Generations are synchronous (barrier): cma's `tell` needs the whole population; a failed candidate gets the
worst finite fitness of its generation.

The checkpoint holds the `CMAEvolutionStrategy` pickled (base64) inside the JSON state: cma has no public
state export, and a pickle restores the exact trajectory. It is only as portable as cma's pickles (same
cma version) and, like any pickle, must come from a trusted archive. It is large — the covariance and its
eigenbasis, 2·D² floats: about 2 MB at D = 256 — and taken once per generation (see GenerationalStrategy).
"""

from __future__ import annotations

import base64
import math
import pickle
from typing import Any

import cma
import numpy as np
from pydantic import Field

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
    popsize: int | None = Field(None, ge=2)
    """None = 4 + ⌊3 ln D⌋ (cma's default)."""


class NormalDraws:
    """cma's `randn(lam, n)` backed by a numpy Generator: seeded, and pickled along with the optimizer."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def __call__(self, lam: int, n: int) -> np.ndarray:
        return self.rng.standard_normal((lam, n))


@register
class CMAES(GenerationalStrategy):
    name = "cmaes"
    Params = CMAESParams
    params: CMAESParams

    def __init__(self, space: SearchSpace, budget: int, seed: int, params: CMAESParams) -> None:
        super().__init__(space, budget, seed, params)
        (self.rng,) = seeded_generators(seed, 1)
        self.popsize = params.popsize or 4 + int(3 * math.log(space.dim))
        self.es = self.optimizer(space.center())

    def optimizer(self, x0: list[float]) -> cma.CMAEvolutionStrategy:
        lo, hi = self.space.bounds()
        options = {
            "popsize": self.popsize,
            "bounds": [lo, hi],
            "CMA_stds": [b - a for a, b in zip(lo, hi)],
            "randn": NormalDraws(self.rng),
            "seed": math.nan,  # "do nothing": cma would otherwise reseed numpy's global generator
            "verbose": -9,
        }
        return cma.CMAEvolutionStrategy(x0, self.params.sigma0, options)

    def warm_start(self, references: list[Reference]) -> None:
        """Centre the search on the best reference the genome can express."""
        for _, coefficients in expressible(references, self.space):
            if (genome := self.space.genome_of(coefficients)) is not None:
                self.es = self.optimizer(genome)
                return

    def breed(self, first_number: int) -> list[Candidate]:
        genomes = [x.tolist() for x in self.es.ask()]
        return [
            Candidate(first_number + i, g, self.space.decode(g), generation=self.generation)
            for i, g in enumerate(genomes)
        ]

    def learn(self, population: list[Candidate], results: list[Result]) -> None:
        fitness = effective_fitness(results)
        self.es.tell([np.array(c.genome) for c in population], [-f for f in fitness])

    def strategy_state(self) -> dict[str, Any]:
        return {"es": base64.b64encode(pickle.dumps(self.es)).decode("ascii")}

    def load_strategy_state(self, state: dict[str, Any]) -> None:
        self.es = pickle.loads(base64.b64decode(state["es"]))
