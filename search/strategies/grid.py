"""Grid search over global coefficients: the static-merge sweep (e.g. CABS's λ grid) as a strategy.

What it spans: every layer (and module set) gets the same genes, so the grid covers merges that are uniform
across depth. `axes: scale` varies one weight shared by all experts (with task arithmetic that is λ) and
`axes: experts` one weight per expert (the full K-dimensional product); where the space evolves densities, a
shared density is a further axis. The points are visited in a seeded random order, so a budget smaller than
the grid samples it evenly instead of sweeping one corner; the run ends after the last point.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import numpy as np
from pydantic import Field

from search.base import Candidate, Result, StrategyBase, StrategyParams, register, seeded_generators
from search.space import SearchSpace

MAX_POINTS = 1_000_000
"""Largest grid: the points are listed up front (`axes: experts` grows as points ** experts)."""


class GridParams(StrategyParams):
    axes: Literal["scale", "experts"] = "scale"
    points: int = Field(5, ge=1, le=101)
    """Points per axis, evenly spaced over the space's range (endpoints included) unless given below."""
    weights: list[float] | None = Field(None, min_length=1, max_length=101)
    """Explicit weight values (within the space's weight range)."""
    densities: list[float] | None = Field(None, min_length=1, max_length=101)
    """Explicit density values (within the space's density range); ignored without evolved densities."""


def axis_values(given: list[float] | None, points: int, lo: float, hi: float, name: str) -> list[float]:
    """The values of one grid axis, refusing given values outside the space's range."""
    if given is None:
        return np.linspace(lo, hi, points).tolist()
    outside = [v for v in given if not lo <= v <= hi]
    if outside:
        raise ValueError(f"search.params.{name}: {outside} outside the space's range [{lo}, {hi}]")
    return list(given)


@register
class GridSearch(StrategyBase):
    name = "grid"
    Params = GridParams
    params: GridParams

    def __init__(self, space: SearchSpace, budget: int, seed: int, params: GridParams) -> None:
        super().__init__(space, budget, seed, params)
        k = len(space.experts)
        weights = axis_values(params.weights, params.points, *space.spec.weight_range, "weights")
        weight_axes = [weights] * (k if params.axes == "experts" else 1)
        density_axes = []
        if space.has_density:
            densities = axis_values(params.densities, params.points, *space.spec.density_range, "densities")
            density_axes = [densities]
        count = math.prod(len(axis) for axis in (*weight_axes, *density_axes))
        if count > MAX_POINTS:
            raise ValueError(f"search.params.points: a grid of {count} points, more than {MAX_POINTS}")
        self.points = [list(p) for p in itertools.product(*weight_axes, *density_axes)]
        (rng,) = seeded_generators(seed, 1)
        self.order = rng.permutation(len(self.points)).tolist()
        self.budget = min(budget, len(self.points))

    def genome(self, point: list[float]) -> list[float]:
        """Repeat one grid point's genes in every block of the space's layout [w_1..w_K, d_1..d_K]."""
        k = len(self.space.experts)
        weights = point[:k] if self.params.axes == "experts" else [point[0]] * k
        densities = [point[-1]] * k if self.space.has_density else []
        return (weights + densities) * (self.space.groups * len(self.space.module_sets))

    def ask(self, n: int) -> list[Candidate]:
        out = []
        for _ in range(min(n, self.remaining())):
            point = self.points[self.order[self.asked]]
            genome = self.genome(point)
            number = self._next_number()
            out.append(Candidate(number, genome, self.space.decode(genome), info={"grid_point": point}))
        return out

    def tell(self, results: list[Result]) -> None:
        self.told += len(results)
