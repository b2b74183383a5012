"""The ask/tell contract every strategy follows, and the strategy registry.

Strategies are pure (no Ray, no SQL, no tensors), seeded, and checkpointable: `state_dict` is JSON and
`load_state_dict` of it continues the exact same trajectory. The driver asks for candidates, has workers
evaluate them, and tells the results back, in any order and any batch size unless `generation_barrier`.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from search.space import SearchSpace


@dataclass
class Candidate:
    """A proposal: `number` is unique within a strategy run (like an Optuna trial number)."""

    number: int
    genome: list[float]
    recipe: dict[str, Any]
    parents: list[int] = field(default_factory=list)
    generation: int = 0
    subset: int = 0
    """Which dev-split chunk to score on (0 = the job's default subset); strategies that cycle data set it."""
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Candidate:
        return cls(**data)


@dataclass
class Result:
    """What a worker learned of a candidate. `fitness` is what the strategy maximises."""

    number: int
    fitness: float
    scores: dict[str, float] = field(default_factory=dict)
    per_example: dict[str, list[float]] = field(default_factory=dict)
    sparsity: float = 0.0
    """Fraction of exact zeros in the merged task vectors (θ* − θ_base), measured by the worker."""
    cost: float = 0.0
    failed: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        return cls(**data)


@dataclass
class Reference:
    """A model the driver scored before the search (the base, an expert, a static merge).

    Strategies start from what these taught (`warm_start`) instead of evaluating them again: `result` holds
    the objective's fitness and the per-example scores on dev chunk `subset`. Its `number` is negative
    (−1, −2, …), so it never collides with a candidate's number, e.g. in a child's `parents`.
    """

    name: str
    recipe: dict[str, Any]
    result: Result
    subset: int = 0


@runtime_checkable
class Strategy(Protocol):
    generation_barrier: bool

    def ask(self, n: int) -> list[Candidate]: ...
    def tell(self, results: list[Result]) -> None: ...
    def done(self) -> bool: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StrategyParams(BaseModel):
    """Base of every strategy's `search.params`: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StrategyBase:
    """Shared bookkeeping: numbering, budget, the registry hook. Subclasses set `name` and `Params`."""

    name: ClassVar[str]
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    generation_barrier: ClassVar[bool] = False

    def __init__(self, space: SearchSpace, budget: int, seed: int, params: StrategyParams) -> None:
        self.space = space
        self.budget = budget
        self.seed = seed
        self.params = params
        self.asked = 0
        self.told = 0

    def _next_number(self) -> int:
        self.asked += 1
        return self.asked - 1

    def remaining(self) -> int:
        """Candidates that may still be asked for within the budget."""
        return max(0, self.budget - self.asked)

    def done(self) -> bool:
        return self.told >= self.budget

    def warm_start(self, references: list[Reference]) -> None:
        """Learn from the references, once, before the first `ask` (the driver calls it on a fresh run only).

        Whatever it changes must be in `state_dict`, so a resumed run never needs it again. The default learns
        nothing: random and grid search sample independently of what was scored.
        """

    def state_dict(self) -> dict[str, Any]:
        """The counters; subclasses extend it with their own state (JSON only)."""
        return {"asked": self.asked, "told": self.told}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.asked = int(state["asked"])
        self.told = int(state["told"])


def seeded_generators(seed: int, n: int) -> list[np.random.Generator]:
    """`n` independent streams, one per purpose, from SeedSequence children of the strategy seed.

    Adding a purpose at the end leaves the earlier streams unchanged, so trajectories stay comparable.
    A stream's `bit_generator.state` is plain ints and strings: JSON round-trips it exactly.
    """
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(n)]


def effective_fitness(results: list[Result]) -> list[float]:
    """Fitness to learn from: failed or non-finite results get the worst finite fitness of the batch.

    A batch of failures only gets 0.0, the bottom of the evaluator's [0, 1] scale, so it stays finite.
    """
    finite = [r.fitness for r in results if not r.failed and math.isfinite(r.fitness)]
    worst = min(finite) if finite else 0.0
    return [r.fitness if not r.failed and math.isfinite(r.fitness) else worst for r in results]


def result_json(result: Result) -> dict[str, Any]:
    """A result as strict JSON (shallow: lists are shared): a NaN fitness becomes None, read back as NaN."""
    data = dict(vars(result))
    if not math.isfinite(data["fitness"]):
        data["fitness"] = None
    return data


def result_from_json(data: dict[str, Any]) -> Result:
    return Result.from_json({**data, "fitness": math.nan if data["fitness"] is None else data["fitness"]})


class GenerationalStrategy(StrategyBase, ABC):
    """A strategy that learns from whole generations (CMA-ES, PSO, SAE): the barrier bookkeeping.

    `breed` makes the next generation when the previous one is fully told; `ask` hands it out in order,
    never beyond the budget; `tell` collects results in any order and calls `learn` with them in candidate
    order once the generation is complete. A generation cut short by the budget is never learned from.

    Checkpoints are cheap enough to take after every tell: a strategy's own state (`strategy_state`: RNG,
    archive, swarm, optimizer) changes only in `breed` and `learn`, so it is serialised once per generation,
    *before* `breed`, as a JSON string; the state adds only the results received since. Loading restores
    that snapshot and breeds again, which re-creates the same population (breeding is deterministic).
    """

    generation_barrier: ClassVar[bool] = True

    def __init__(self, space: SearchSpace, budget: int, seed: int, params: StrategyParams) -> None:
        super().__init__(space, budget, seed, params)
        self.generation = 0
        self.population: list[Candidate] = []
        self.received: dict[int, Result] = {}
        self.snapshot: str | None = None
        """`strategy_state()` as JSON, taken before the current generation was bred (None: not taken yet)."""

    @abstractmethod
    def breed(self, first_number: int) -> list[Candidate]:
        """The next generation's candidates, numbered from `first_number`, with `generation` set."""
        ...

    @abstractmethod
    def learn(self, population: list[Candidate], results: list[Result]) -> None:
        """Update from a complete generation; `results[i]` belongs to `population[i]`."""
        ...

    @abstractmethod
    def strategy_state(self) -> dict[str, Any]:
        """Everything `breed` and `learn` read besides the population and counters, as JSON."""
        ...

    @abstractmethod
    def load_strategy_state(self, state: dict[str, Any]) -> None:
        ...

    def take_snapshot(self) -> str:
        if self.snapshot is None:
            self.snapshot = json.dumps(self.strategy_state(), allow_nan=False)
        return self.snapshot

    def ask(self, n: int) -> list[Candidate]:
        if n <= 0 or self.remaining() == 0:
            return []
        if not self.population:
            self.take_snapshot()
            self.population = self.breed(self.asked)
        first = self.population[0].number
        unasked = first + len(self.population) - self.asked
        count = min(n, self.remaining(), unasked)
        return [self.population[self._next_number() - first] for _ in range(count)]

    def tell(self, results: list[Result]) -> None:
        first = self.population[0].number if self.population else 0
        for r in results:
            awaited = first <= r.number < min(self.asked, first + len(self.population))
            if not awaited or r.number in self.received:
                raise ValueError(f"{self.name}: candidate {r.number} is not awaited in this generation")
            self.received[r.number] = r
            self.told += 1
        if self.population and len(self.received) == len(self.population):
            self.learn(self.population, [self.received[c.number] for c in self.population])
            self.generation += 1
            self.population, self.received, self.snapshot = [], {}, None

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "generation": self.generation,
            "bred_from": self.population[0].number if self.population else None,
            "snapshot": self.take_snapshot(),
            "received": [result_json(r) for r in self.received.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generation = int(state["generation"])
        self.snapshot = state["snapshot"]
        self.load_strategy_state(json.loads(self.snapshot))
        self.population = [] if state["bred_from"] is None else self.breed(int(state["bred_from"]))
        self.received = {r["number"]: result_from_json(r) for r in state["received"]}


def expressible(references: list[Reference], space: SearchSpace) -> list[tuple[Reference, list[float]]]:
    """The references whose recipe is a uniform task-vector combination, with its coefficients, best first.

    Strategies that move task-vector coefficients (the space's genome, PSO's α, SAE's members) place these
    exactly; others (TIES, copies of layers) have no coordinates in those spaces and are left out.
    """
    usable = [r for r in references if not r.result.failed and math.isfinite(r.result.fitness)]
    found = [(r, c) for r in usable if (c := space.coefficients_of(r.recipe)) is not None]
    return sorted(found, key=lambda rc: -rc[0].result.fitness)


STRATEGIES: dict[str, type[StrategyBase]] = {}


def register(cls: type[StrategyBase]) -> type[StrategyBase]:
    STRATEGIES[cls.name] = cls
    return cls


def make_strategy(
    name: str, space: SearchSpace, budget: int, seed: int, params: dict[str, Any] | None = None
) -> StrategyBase:
    """Build a registered strategy; a bad parameter raises ValueError with one line naming it."""
    import search.strategies  # noqa: F401  (registers every strategy)

    if name not in STRATEGIES:
        known = ", ".join(sorted(STRATEGIES))
        raise ValueError(f"search.strategy: unknown strategy '{name}' (known: {known})")
    cls = STRATEGIES[name]
    try:
        validated = cls.Params.model_validate(params or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "".join(f".{p}" for p in err["loc"])
        raise ValueError(f"search.params{where}: {err['msg']}") from None
    return cls(space, budget, seed, validated)
