"""PSO-Merging (ALGORITHMS.md §5) in its exact low-dimensional form.

The swarm has 2N + 1 particles that start at the 2N + 1 basis models: the base, the N experts and the N
DARE-sparsified experts (drop rate p, masks fixed by the run's recipe seed). With v0 = 0 and scalar r1, r2
per particle per step, every position stays an affine combination x = Σ_b α_b B_b with Σ_b α_b = 1, so the
swarm moves α instead of full weights: θ(α) = θ_base + Σ_i α_i δ_i + Σ_i α_{N+i} DARE(δ_i), which is the
`dare_affine` operator with dense = α_1..α_N, sparse = α_{N+1}..α_{2N}. One α per layer group of the space.

The affine constraint: the swarm moves the 2N free coefficients and the base's α_0 = 1 − Σ α is implied, so
Σ α = 1 holds exactly. Without clamping this is the same trajectory as full-weight PSO (α_0's velocity is
minus the sum of the others'); velocity clamping |v| ≤ v_max·(high − low) and reflection at [low, high]
act on the free coefficients only (reflection also reverses that component's velocity), and α_0 is left
unbounded — bounding it too would break either Σ α = 1 or that equivalence.

Layer groups: every group starts one-hot at the same basis model, so with one (r1, r2) per particle per
step, as the paper's scalar form has it, all groups move identically forever and per-layer PSO equals
global PSO. `draws: group` (default) draws a scalar pair per particle, step *and* group: each group's α is
still an exact affine combination, and layers can differ. `draws: particle` is the literal form.

Known weakness (measured on the synthetic tests): starting at the corners, the swarm collapses onto gbest.
In the first step v = c2·r2·(gbest − x) with pbest = x; corner differences are ±1, so whenever 2·r2 > 1
the clamp |v| ≤ 1 lands the particle exactly on gbest — half the swarm duplicates it.

Particle j's candidate genome is its full α per group, [α_0, α_1..α_2N] × groups; gbest is the output.
Iteration 0 evaluates the basis models, so the paper's S iterations cost (2N + 1)(S + 1) evaluations.

Warm start: a reference that sits on a basis model (the base, an expert) gives that particle its score, so
iteration 0 does not evaluate it again; the best reference that is a task-vector combination (e.g. the uniform
average, dense α = its coefficients) joins the swarm as one more particle, scored too. Iteration 0 then asks
only the particles without a score (the DARE experts).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

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


class PSOParams(StrategyParams):
    w: float = 0.2
    """Inertia (the only constant the paper ablates)."""
    c1: float = 2.0
    c2: float = 2.0
    drop_rate: float = Field(0.8, ge=0, lt=1)
    """DARE's p for the sparsified basis models (density 1 − p)."""
    low: float = -0.5
    high: float = 1.5
    v_max: float = Field(0.5, gt=0, le=1)
    """Velocity clamp as a fraction of (high − low); at most 1, so one reflection always lands inside."""
    draws: Literal["group", "particle"] = "group"
    """r1, r2 per particle per step and per layer group, or per particle per step only (paper-literal)."""

    @model_validator(mode="after")
    def _bounds(self) -> PSOParams:
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        return self


def pso_step(
    x: np.ndarray,
    v: np.ndarray,
    pbest: np.ndarray,
    gbest: np.ndarray,
    r1: float | np.ndarray,
    r2: float | np.ndarray,
    params: PSOParams,
) -> tuple[np.ndarray, np.ndarray]:
    """One PSO move: v ← w·v + c1·r1·(pbest − x) + c2·r2·(gbest − x), clamped; x ← x + v, reflected."""
    v_max = params.v_max * (params.high - params.low)
    v = np.clip(params.w * v + params.c1 * r1 * (pbest - x) + params.c2 * r2 * (gbest - x), -v_max, v_max)
    x = x + v
    below, above = x < params.low, x > params.high
    x = np.where(below, 2 * params.low - x, np.where(above, 2 * params.high - x, x))
    return x, np.where(below | above, -v, v)


@register
class PSO(GenerationalStrategy):
    name = "pso"
    Params = PSOParams
    params: PSOParams

    def __init__(self, space: SearchSpace, budget: int, seed: int, params: PSOParams) -> None:
        super().__init__(space, budget, seed, params)
        (self.rng,) = seeded_generators(seed, 1)
        n = len(space.experts)
        self.particles = 2 * n + 1
        # Particle b starts at basis model b in every group: b = 0 is the base (all free coefficients 0).
        basis = np.vstack([np.zeros(2 * n), np.eye(2 * n)])
        self.x = np.repeat(basis[:, None, :], space.groups, axis=1)
        self.v = np.zeros_like(self.x)
        self.pbest = self.x.copy()
        self.pbest_fitness = np.full(self.particles, -np.inf)  # None in the JSON state (no infinities)
        self.gbest = self.x[0].copy()
        self.gbest_fitness = -np.inf
        self.gbest_number = -1
        """Candidate number of the best position so far: the run's output."""

    def warm_start(self, references: list[Reference]) -> None:
        """Score the basis particles the references match; add the best other reference as a particle."""
        n = len(self.space.experts)
        added = False
        for reference, coefficients in expressible(references, self.space):
            position = np.concatenate([coefficients, np.zeros(n)])
            fitness = reference.result.fitness
            matches = [j for j in range(self.particles) if np.allclose(self.x[j], position)]
            inside = np.all((position >= self.params.low) & (position <= self.params.high))
            if not matches and not added and inside:
                added = True
                self.x = np.concatenate([self.x, np.repeat(position[None, None, :], self.space.groups, 1)])
                self.v, self.pbest = np.zeros_like(self.x), self.x.copy()
                self.pbest_fitness = np.append(self.pbest_fitness, -np.inf)
                self.particles += 1
                matches = [self.particles - 1]
            for j in matches:
                self.pbest_fitness[j] = max(self.pbest_fitness[j], fitness)
                if fitness > self.gbest_fitness:
                    self.gbest_fitness, self.gbest = fitness, self.x[j].copy()
                    self.gbest_number = reference.result.number

    def genome(self, position: np.ndarray) -> list[float]:
        """Full α per group, base coefficient first: [1 − Σ α, α_1..α_2N] × groups."""
        full = np.concatenate([1 - position.sum(1, keepdims=True), position], axis=1)
        return full.ravel().tolist()

    def recipe(self, position: np.ndarray) -> dict[str, Any]:
        n = len(self.space.experts)
        density = round(1 - self.params.drop_rate, 6)

        def params(alpha: np.ndarray) -> dict[str, Any]:
            coefficients = [round(float(a), 6) for a in alpha]
            return {"dense": coefficients[:n], "sparse": coefficients[n:], "density": density}

        layers = [
            {"from": i, "op": "dare_affine", "params": params(position[self.space.group_of(i)])}
            for i in range(self.space.num_layers)
        ]
        return self.space.assemble(layers, {"op": "dare_affine", "params": params(position.mean(0))})

    def breed(self, first_number: int) -> list[Candidate]:
        if self.generation > 0:
            groups = self.space.groups if self.params.draws == "group" else 1
            r = self.rng.random((2, self.particles, groups, 1))
            self.x, self.v = pso_step(self.x, self.v, self.pbest, self.gbest, r[0], r[1], self.params)
        everyone = list(range(self.particles))
        unscored = [j for j in everyone if not np.isfinite(self.pbest_fitness[j])]  # not warm-started
        asked = (unscored or everyone) if self.generation == 0 else everyone
        return [
            Candidate(
                first_number + i,
                self.genome(self.x[j]),
                self.recipe(self.x[j]),
                generation=self.generation,
                info={"particle": j, "iteration": self.generation},
            )
            for i, j in enumerate(asked)
        ]

    def learn(self, population: list[Candidate], results: list[Result]) -> None:
        for candidate, fitness in zip(population, effective_fitness(results)):
            j = candidate.info["particle"]
            if fitness > self.pbest_fitness[j]:
                self.pbest_fitness[j], self.pbest[j] = fitness, self.x[j].copy()
            if fitness > self.gbest_fitness:
                self.gbest_fitness, self.gbest_number = fitness, candidate.number
                self.gbest = self.x[j].copy()

    def strategy_state(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "x": self.x.tolist(),
            "v": self.v.tolist(),
            "pbest": self.pbest.tolist(),
            "pbest_fitness": [f if np.isfinite(f) else None for f in self.pbest_fitness.tolist()],
            "gbest": self.gbest.tolist(),
            "gbest_fitness": self.gbest_fitness if np.isfinite(self.gbest_fitness) else None,
            "gbest_number": self.gbest_number,
        }

    def load_strategy_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.x, self.v, self.pbest = (np.array(state[k], dtype=float) for k in ("x", "v", "pbest"))
        self.pbest_fitness = np.array([-np.inf if f is None else f for f in state["pbest_fitness"]], float)
        self.gbest = np.array(state["gbest"], dtype=float)
        self.gbest_fitness = -np.inf if state["gbest_fitness"] is None else float(state["gbest_fitness"])
        self.gbest_number = int(state["gbest_number"])
        self.particles = len(self.x)
