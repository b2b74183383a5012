"""SAE — Sparsity-Aware Evolution (ALGORITHMS.md §4.2) on M2N2's archive, competition and attraction (§4.1).

An individual is a merge recipe, not a weight tensor: per layer group, one coefficient per expert, plus a
target density. It materializes as `magnitude_prune` with `scope: merged`, i.e. θ_base + trim(Σ_k c_k δ_k, d):
the combined task vector magnitude-pruned to density d (the product's `sae_prune_space: delta`).

- Archive: `archive_size` individuals with their per-example scores (each task's `per_example`, tasks in
  sorted order, concatenated; a result without them counts as one example scoring its fitness).
- Competition: fitness sharing z_j = (Σ_k s_kj)^α, f_k = Σ_j s_kj / z_j over the N members of archive ∪
  {child}; the member with the lowest sparsity-aware fitness F_k = N^α·f_k / J_k + β_F·z_k (J_k its number of
  examples, z its measured zero fraction) is replaced by the child, unless the child is the lowest (or ties
  it). N^α / J puts f on the accuracy scale: with α = 0, F = mean score + β_F·z exactly.
- Matchmaking (`pairing: m2n2`): parent 1 ∝ f, parent 2 ∝ attraction Σ_j max(0, s_kj/z_j − s_1j/z_j);
  `pairing: random` pairs a random permutation of the archive (the paper's K/2 random pairs).
- Crossover (Eq. 4–5): child coefficients c^(l) = λ^(l) c_A^(l) + (1 − λ^(l)) c_B^(l), with
  λ^(l) = (s_A + ω_A^(l)) / (s_A + ω_A^(l) + s_B + ω_B^(l)), s = the parents' fitness, ω = β_ω·z.
  `crossover: split` uses M2N2's per-layer λ instead (w before a random layer boundary, 1 − w after).
- Mutation (annealed pruning): the child's density is 1 − s(t), `sparsity_schedule` at t = generation − 1.
- Initial population (generation 0): the base (all coefficients 0, so a crossover with it shrinks the task
  vector: c ← λ·c), and each expert dense (one-hot coefficients, density 1) and pruned to each of
  `initial_sparsities` (default: the schedule's first cycle, 0.1 / 0.35 / 0.6).
- Warm start: every reference that is a task-vector combination (base, experts, uniform average, task
  arithmetic) enters the archive with its scores as they were measured; generation 0 skips the individuals
  the archive already holds.
- Each generation is scored on a fresh dev chunk (`subset = generation`, `subsets: fresh`).

Where this differs from crossing full weights, as the paper does:
- The paper interpolates the parents' *pruned* weights, so where parent A is zero the child takes (1 − λ)·θ_B
  ("attraction by zeros"), and pruning the parents changes the child. Here the child re-combines the parents'
  dense coefficient mixtures and is then pruned once to s(t): the parents' masks are not inherited, so
  sparsity steers the child only through ω in λ and through F in the competition, and the schedule's
  pruning "of the individual models" has no separate effect. A recipe cannot nest pruned mixtures; this keeps
  every individual one flat recipe.
- With `sparsity_scope: global`, λ is the same in every layer, and since the initial individuals are the
  same in every layer, every individual stays uniform across depth. `sparsity_scope: layer` uses each
  group's nominal zero fraction 1 − d, the only per-layer figure a result carries; as an individual has one
  density, it equals that of every layer, so it differs from `global` only by nominal vs measured sparsity.
  Per-layer sparsity reported by the worker would make it meaningful.
- Fresh chunks per generation mean members were scored on different examples. Sharing then estimates z_j
  from the members scored on example j, scaled to the archive: z_j = (N · mean_{k scored} s_kj)^α; with all
  members on one chunk (`subsets: fixed`) this is exactly M2N2's z. Attraction counts only examples both
  scored; when it is zero everywhere (no shared chunk), parent 2 is drawn ∝ f like parent 1.
- A pair is crossed at most once per generation (λ is deterministic, so a repeated pair repeats its child).
- Failed children never enter the archive. If fewer than two members survive, the next generation repeats
  the initial population.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from search.base import (
    Candidate,
    GenerationalStrategy,
    Reference,
    Result,
    StrategyParams,
    expressible,
    register,
    seeded_generators,
)
from search.space import SearchSpace


def sparsity_schedule(t: int, s_min: float, s_max: float, t0: int, t_mult: int) -> float:
    """Target sparsity at step t: s_min → s_max within a cycle (endpoint-inclusive cosine), then a restart.

    Cycles last t0, t0·t_mult, t0·t_mult², … steps (SGDR-like warm restarts, §4.2).
    """
    t_cur, length = t, t0
    while t_cur >= length:
        t_cur, length = t_cur - length, length * t_mult
    return s_min + (s_max - s_min) * 0.5 * (1 - math.cos(math.pi * t_cur / max(length - 1, 1)))


def shared_fitness(scores: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """M2N2 fitness sharing over members × examples: (z per example, f per member).

    NaN marks an example a member was not scored on; z_j is then estimated from the members that were, scaled
    to the whole pool, so a matrix without NaN gives exactly z_j = (Σ_k s_kj)^α (0 → 1), f_k = Σ_j s_kj / z_j.
    """
    scored = (~np.isnan(scores)).sum(0)
    totals = np.nansum(scores, 0) * len(scores) / np.maximum(scored, 1)
    z = totals**alpha
    z[z == 0] = 1.0
    return z, np.nansum(scores / z, 1)


def attraction(scores: np.ndarray, z: np.ndarray, parent: int) -> np.ndarray:
    """M2N2 matchmaking weights for the second parent: Σ_j max(0, s_kj/z_j − s_pj/z_j); 0 for the parent."""
    gain = np.maximum(scores / z - scores[parent] / z, 0.0)
    weights = np.nansum(gain, 1)
    weights[parent] = 0.0
    return weights


def crossover_ratio(score_a: float, omega_a: np.ndarray, score_b: float, omega_b: np.ndarray) -> np.ndarray:
    """Eq. 5 per layer: λ = (s_A + ω_A) / (s_A + ω_A + s_B + ω_B), clipped to [0, 1]; 0.5 if 0 / 0."""
    a, b = score_a + np.asarray(omega_a, float), score_b + np.asarray(omega_b, float)
    total = a + b
    ratio = np.divide(a, total, out=np.full_like(total, 0.5), where=total != 0)
    return np.clip(ratio, 0.0, 1.0)


@dataclass
class Member:
    """An archive individual: its recipe genes, and what its evaluation measured."""

    number: int
    coefficients: list[list[float]]
    """Per layer group, one coefficient per expert."""
    density: float
    fitness: float
    sparsity: float
    subset: int
    scores: list[float]
    """Per-example scores, tasks in sorted order, concatenated."""


class SAEParams(StrategyParams):
    archive_size: int = Field(20, ge=2, le=10_000)
    alpha: float = Field(1.0, ge=0)
    """Fitness-sharing exponent; 0 = plain accuracy (M2N2's `ga` mode)."""
    pairing: Literal["m2n2", "random"] = "m2n2"
    crossover: Literal["eq5", "split"] = "eq5"
    """eq5: λ from the parents' scores and sparsity (Eq. 4–5); split: M2N2's per-layer λ, w ~ U(0, 1) before a
    random layer-group boundary and 1 − w after it (only differs with per-layer groups)."""
    offspring: int | None = Field(None, ge=1, le=10_000)
    """Children per generation; None = half the archive (the paper's K/2 pairs)."""
    sparsity_scope: Literal["global", "layer"] = "global"
    beta_omega: float = Field(1.0, ge=0)
    beta_f: float = Field(0.1, ge=0)
    s_min: float = Field(0.1, ge=0, lt=1)
    s_max: float = Field(0.6, ge=0, lt=1)
    t0: int = Field(3, ge=1, le=10_000)
    t_mult: int = Field(2, ge=1, le=100)
    initial_sparsities: list[float] | None = None
    """Sparsities of the initial pruned variants; None = the schedule's first cycle."""
    subsets: Literal["fresh", "fixed"] = "fresh"
    """fresh: generation g is scored on dev chunk g; fixed: all on chunk 0 (exact M2N2 sharing)."""

    @model_validator(mode="after")
    def _ranges(self) -> SAEParams:
        if self.s_min > self.s_max:
            raise ValueError(f"s_min {self.s_min} must not exceed s_max {self.s_max}")
        if self.initial_sparsities is not None and not all(0 <= s < 1 for s in self.initial_sparsities):
            raise ValueError(f"initial_sparsities {self.initial_sparsities} must lie in [0, 1)")
        return self


@register
class SAE(GenerationalStrategy):
    name = "sae"
    Params = SAEParams
    params: SAEParams

    def __init__(self, space: SearchSpace, budget: int, seed: int, params: SAEParams) -> None:
        super().__init__(space, budget, seed, params)
        (self.rng,) = seeded_generators(seed, 1)
        self.archive: list[Member] = []

    def schedule(self, t: int) -> float:
        p = self.params
        return sparsity_schedule(t, p.s_min, p.s_max, p.t0, p.t_mult)

    # -- recipes ---------------------------------------------------------------------------------------------

    def recipe_of(self, genome: list[float]) -> dict[str, Any]:
        """Genome = coefficients (groups × K, row-major), then the density."""
        coefficients = np.array(genome[:-1]).reshape(self.space.groups, len(self.space.experts))
        density = float(genome[-1])

        def params(c: np.ndarray) -> dict[str, Any]:
            weights = [round(float(w), 6) for w in c]
            return {"weights": weights, "density": density, "lambda": 1.0, "scope": "merged"}

        layers = [
            {"from": i, "op": "magnitude_prune", "params": params(coefficients[self.space.group_of(i)])}
            for i in range(self.space.num_layers)
        ]
        return self.space.assemble(layers, {"op": "magnitude_prune", "params": params(coefficients.mean(0))})

    def candidate(
        self, number: int, coefficients: np.ndarray, density: float, parents: list[int], info: dict[str, Any]
    ) -> Candidate:
        genome = [*coefficients.ravel().tolist(), float(density)]
        return Candidate(
            number,
            genome=genome,
            recipe=self.recipe_of(genome),
            parents=parents,
            generation=self.generation,
            subset=self.generation if self.params.subsets == "fresh" else 0,
            info=info,
        )

    def initial_population(self, first_number: int) -> list[Candidate]:
        k = len(self.space.experts)
        sparsities = self.params.initial_sparsities
        if sparsities is None:
            sparsities = [self.schedule(t) for t in range(self.params.t0)]
        known = [(np.array(m.coefficients), m.density) for m in self.archive]
        individuals = [(np.zeros((self.space.groups, k)), 1.0, {"expert": None, "target_sparsity": 0.0})]
        for expert in range(k):
            coefficients = np.zeros((self.space.groups, k))
            coefficients[:, expert] = 1.0
            for sparsity in [0.0, *sparsities]:
                info = {"expert": self.space.experts[expert], "target_sparsity": sparsity}
                individuals.append((coefficients, 1.0 - sparsity, info))
        out = []
        for coefficients, density, info in individuals:
            if not any(np.allclose(c, coefficients) and d == density for c, d in known):
                out.append(self.candidate(first_number + len(out), coefficients, density, [], info))
        return out

    def warm_start(self, references: list[Reference]) -> None:
        """Put every reference the members' form can hold into the archive, as measured (best first)."""
        for reference, coefficients in expressible(references, self.space)[: self.params.archive_size]:
            groups = [list(coefficients)] * self.space.groups
            self.archive.append(self.member(reference.result, groups, 1.0, reference.subset))

    def member(self, result: Result, coefficients: list[list[float]], density: float, subset: int) -> Member:
        """An archive member from a result: its per-example scores, tasks in sorted order, concatenated."""
        tasks = sorted(result.per_example)
        scores = [float(s) for t in tasks for s in result.per_example[t]] or [result.fitness]
        return Member(result.number, coefficients, density, result.fitness, result.sparsity, subset, scores)

    # -- the archive -----------------------------------------------------------------------------------------

    def score_matrix(self, members: list[Member]) -> np.ndarray:
        """Members × examples, one block of columns per dev chunk; NaN where a member was not scored."""
        widths: dict[int, int] = {}
        for m in members:
            widths[m.subset] = max(widths.get(m.subset, 0), len(m.scores))
        offsets, total = {}, 0
        for subset in sorted(widths):
            offsets[subset], total = total, total + widths[subset]
        matrix = np.full((len(members), total), np.nan)
        for i, m in enumerate(members):
            matrix[i, offsets[m.subset] : offsets[m.subset] + len(m.scores)] = m.scores
        return matrix

    def sparsity_aware_fitness(
        self, members: list[Member], scores: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(f, F): shared fitness, and F = N^α·f / J + β_F·z (N members, J = the member's examples).

        N^α puts sharing on the accuracy scale: N identical members with 0/1 scores have N^α·f / J = accuracy,
        so β_F trades sparsity against accuracy as §4.2 intends, whatever the archive size. `scores` is the
        members' score matrix when the caller has it already.
        """
        scores = self.score_matrix(members) if scores is None else scores
        _, f = shared_fitness(scores, self.params.alpha)
        examples = np.array([len(m.scores) for m in members], float)
        sparsity = np.array([m.sparsity for m in members])
        return f, len(members) ** self.params.alpha * f / examples + self.params.beta_f * sparsity

    def compete(self, child: Member, scores: np.ndarray | None = None) -> int | None:
        """Insert the child, replacing the archive's lowest F unless the child is (or ties) the lowest.

        Returns its archive index, or None when it is dropped. `scores`: the matrix of archive ∪ child.
        """
        if len(self.archive) < self.params.archive_size:
            self.archive.append(child)
            return len(self.archive) - 1
        _, fitness = self.sparsity_aware_fitness([*self.archive, child], scores)
        weakest = int(np.argmin(fitness[:-1]))
        if fitness[-1] <= fitness[weakest]:
            return None
        self.archive[weakest] = child
        return weakest

    # -- pairing and crossover -------------------------------------------------------------------------------

    def draw(self, weights: np.ndarray, exclude: set[int]) -> int:
        """An index ∝ weights outside `exclude` (never all of them); uniform when those weights are all 0."""
        allowed = np.ones(len(weights), bool)
        allowed[list(exclude)] = False
        w = np.where(allowed, np.maximum(weights, 0.0), 0.0)
        if w.sum() <= 0:
            w = allowed.astype(float)
        return int(self.rng.choice(len(w), p=w / w.sum()))

    def pairs(self, count: int, scores: np.ndarray) -> list[tuple[int, int]]:
        """`count` parent pairs (archive indices), each unordered pair at most once when possible.

        `scores` is the archive's score matrix (matchmaking reads the shared per-example scores).
        """
        n = len(self.archive)
        out: list[tuple[int, int]] = []
        if self.params.pairing == "random":
            while len(out) < count:
                order = self.rng.permutation(n).tolist()
                out += [(order[i], order[i + 1]) for i in range(0, n - 1, 2)]
            return out[:count]
        z, f = shared_fitness(scores, self.params.alpha)
        used: set[frozenset[int]] = set()
        for _ in range(count):
            for _attempt in range(4 * n):  # redraw a pair already crossed, within reason
                first = self.draw(f, set())
                partners = attraction(scores, z, first)
                second = self.draw(partners if partners.sum() > 0 else f, {first})
                if frozenset((first, second)) not in used:
                    break
            used.add(frozenset((first, second)))
            out.append((first, second))
        return out

    def omega(self, member: Member) -> np.ndarray:
        """Sparsity weights ω = β_ω·z per layer group (measured z, or per-layer nominal 1 − d)."""
        z = member.sparsity if self.params.sparsity_scope == "global" else 1.0 - member.density
        return np.full(self.space.groups, self.params.beta_omega * z)

    def offspring(self, first_number: int) -> list[Candidate]:
        target = self.schedule(self.generation - 1)
        scores = self.score_matrix(self.archive)
        _, fitness = self.sparsity_aware_fitness(self.archive, scores)
        count = self.params.offspring or max(1, len(self.archive) // 2)
        out = []
        for a, b in self.pairs(count, scores):
            pa, pb = self.archive[a], self.archive[b]
            omega_a, omega_b = self.omega(pa), self.omega(pb)
            if self.params.crossover == "split":
                split, w = self.rng.integers(0, self.space.groups + 1), self.rng.random()
                ratio = np.where(np.arange(self.space.groups) < split, w, 1 - w)[:, None]
            else:
                ratio = crossover_ratio(pa.fitness, omega_a, pb.fitness, omega_b)[:, None]
            coefficients = ratio * np.array(pa.coefficients) + (1 - ratio) * np.array(pb.coefficients)
            info = {
                "lambda": ratio.ravel().round(6).tolist(),
                "omega": [omega_a.round(6).tolist(), omega_b.round(6).tolist()],
                "parent_fitness": [pa.fitness, pb.fitness],
                "parent_F": [round(float(fitness[a]), 6), round(float(fitness[b]), 6)],
                "target_sparsity": round(target, 6),
            }
            number = first_number + len(out)
            out.append(self.candidate(number, coefficients, 1.0 - target, [pa.number, pb.number], info))
        return out

    # -- the generation loop ---------------------------------------------------------------------------------

    def breed(self, first_number: int) -> list[Candidate]:
        if self.generation == 0 or len(self.archive) < 2:
            return self.initial_population(first_number)
        return self.offspring(first_number)

    def learn(self, population: list[Candidate], results: list[Result]) -> None:
        k = len(self.space.experts)
        children = []
        for candidate, result in zip(population, results):
            if result.failed or not math.isfinite(result.fitness):
                continue
            coefficients = np.array(candidate.genome[:-1]).reshape(self.space.groups, k).tolist()
            children.append(self.member(result, coefficients, candidate.genome[-1], candidate.subset))
        # One score matrix for the whole generation; `rows` tracks which of its rows the archive holds.
        matrix = self.score_matrix([*self.archive, *children])
        rows = list(range(len(self.archive)))
        for row, child in enumerate(children, start=len(rows)):
            slot = self.compete(child, matrix[[*rows, row]])
            if slot == len(rows):
                rows.append(row)
            elif slot is not None:
                rows[slot] = row

    def strategy_state(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "archive": [dict(vars(m)) for m in self.archive]}

    def load_strategy_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.archive = [Member(**m) for m in state["archive"]]
