"""Random search (ALGORITHMS.md §7): the floor every strategy must beat at an equal evaluation budget.

It samples the space's own genome, so its candidates are directly comparable with CMA-ES and grid. Weights
per block (layer group × module set) are Dirichlet(1)·w_scale — random *mixtures*, the region where merges
work — or U[lo, hi] over the space's weight range; densities, where the operator trims, are U[d_min, d_max].
No generation barrier: every candidate is independent.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from search.base import Candidate, Result, StrategyBase, StrategyParams, register, seeded_generators
from search.space import SearchSpace


class RandomParams(StrategyParams):
    weights: Literal["dirichlet", "uniform"] = "dirichlet"
    w_scale: float = Field(1.0, gt=0)
    """Dirichlet weights sum to w_scale per block (clipped to the space's weight range)."""
    d_min: float | None = Field(None, gt=0, le=1)
    """Lowest density drawn; None = the space's density range."""
    d_max: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _density_order(self) -> RandomParams:
        if self.d_min is not None and self.d_max is not None and not self.d_min < self.d_max:
            raise ValueError(f"d_min {self.d_min} must be below d_max {self.d_max}")
        return self


@register
class RandomSearch(StrategyBase):
    name = "random"
    Params = RandomParams
    params: RandomParams

    def __init__(self, space: SearchSpace, budget: int, seed: int, params: RandomParams) -> None:
        super().__init__(space, budget, seed, params)
        (self.rng,) = seeded_generators(seed, 1)
        lo, hi = space.spec.density_range
        self.d_min = lo if params.d_min is None else params.d_min
        self.d_max = hi if params.d_max is None else params.d_max
        if not self.d_min < self.d_max:
            raise ValueError(f"search.params: density range [{self.d_min}, {self.d_max}] is empty")

    def sample(self) -> list[float]:
        """One genome, drawn block by block in the space's layout [w_1..w_K, d_1..d_K]."""
        space, k = self.space, len(self.space.experts)
        blocks = space.groups * len(space.module_sets)
        if self.params.weights == "dirichlet":
            weights = self.rng.dirichlet(np.ones(k), size=blocks) * self.params.w_scale
        else:
            weights = self.rng.uniform(*space.spec.weight_range, size=(blocks, k))
        parts = [weights]
        if space.has_density:
            parts.append(self.rng.uniform(self.d_min, self.d_max, size=(blocks, k)))
        return space.clip(np.concatenate(parts, axis=1).ravel().tolist())

    def ask(self, n: int) -> list[Candidate]:
        out = []
        for _ in range(min(n, self.remaining())):
            genome = self.sample()
            out.append(Candidate(number=self._next_number(), genome=genome, recipe=self.space.decode(genome)))
        return out

    def tell(self, results: list[Result]) -> None:
        self.told += len(results)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rng.bit_generator.state = state["rng"]
