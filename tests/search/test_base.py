import json
import math

import pytest

from search.base import (
    STRATEGIES,
    Result,
    Strategy,
    effective_fitness,
    make_strategy,
    result_from_json,
    result_json,
)
from tests.search.synthetic import make_space

MINE = ("random", "grid", "cmaes", "pso", "sae")


def test_failed_results_learn_as_the_worst_finite_fitness() -> None:
    results = [Result(0, 0.3), Result(1, math.nan, failed=True), Result(2, 0.5), Result(3, math.inf)]
    assert effective_fitness(results) == [0.3, 0.3, 0.5, 0.3]
    assert effective_fitness([Result(0, math.nan, failed=True)]) == [0.0]


def test_result_json_is_strict_and_round_trips() -> None:
    failed = Result(4, math.nan, per_example={"t": [1.0, 0.0]}, failed=True, error="oom")
    data = json.loads(json.dumps(result_json(failed), allow_nan=False))
    back = result_from_json(data)
    assert math.isnan(back.fitness) and back.per_example == {"t": [1.0, 0.0]} and back.error == "oom"


@pytest.mark.parametrize("name", MINE)
def test_every_strategy_is_registered_and_follows_the_protocol(name: str) -> None:
    strategy = make_strategy(name, make_space(), 10, 0)
    assert name in STRATEGIES and isinstance(strategy, Strategy)
    assert strategy.generation_barrier == (name in ("cmaes", "pso", "sae"))
    assert len(strategy.ask(3)) <= 3 and not strategy.done()


def test_unknown_strategy_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'annealing'") as err:
        make_strategy("annealing", make_space(), 10, 0)
    assert "\n" not in str(err.value)
