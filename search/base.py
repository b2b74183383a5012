"""The ask/tell contract every strategy follows, and the strategy registry.

Strategies are pure (no Ray, no SQL, no tensors), seeded, and checkpointable: `state_dict` is JSON and
`load_state_dict` of it continues the exact same trajectory. The driver asks for candidates, has workers
evaluate them, and tells the results back, in any order and any batch size unless `generation_barrier`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

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


STRATEGIES: dict[str, type[StrategyBase]] = {}


def register(cls: type[StrategyBase]) -> type[StrategyBase]:
    STRATEGIES[cls.name] = cls
    return cls


def make_strategy(
    name: str, space: SearchSpace, budget: int, seed: int, params: dict[str, Any] | None = None
) -> StrategyBase:
    """Build a registered strategy, validating its parameters (pydantic errors name the field)."""
    import search.strategies  # noqa: F401  (registers every strategy)

    if name not in STRATEGIES:
        raise ValueError(f"search.strategy: unknown strategy '{name}' (known: {', '.join(sorted(STRATEGIES))})")
    cls = STRATEGIES[name]
    return cls(space, budget, seed, cls.Params.model_validate(params or {}))
