import numpy as np
import pytest

from search.base import make_strategy
from tests.search.synthetic import Loop, SyntheticWorker, make_space, resumed_run, trajectory

WORKER = SyntheticWorker(layers=2, experts=2)


def make(budget: int = 100, space_op: str = "ties", **params: object):
    return make_strategy("grid", make_space(op=space_op, layers=2, experts=2), budget, 0, dict(params))


def test_scale_grid_spans_shared_weight_times_density() -> None:
    strategy = make(points=3)
    loop = Loop(strategy, WORKER).run()
    assert len(loop.asked) == 9 and strategy.done()  # the run ends with the grid, below the budget
    points = {tuple(c.genome[:4]) for c in loop.asked}
    expected = {(w, w, d, d) for w in (0.0, 0.5, 1.0) for d in (0.1, 0.55, 1.0)}
    assert points == expected
    assert all(c.genome[:4] == c.genome[4:] for c in loop.asked)  # same genes in every layer


def test_experts_grid_is_the_product_over_expert_weights() -> None:
    strategy = make(space_op="task_arithmetic", axes="experts", weights=[0.2, 0.8])
    genomes = {tuple(c.genome[:2]) for c in Loop(strategy, WORKER).run().asked}
    assert genomes == {(0.2, 0.2), (0.2, 0.8), (0.8, 0.2), (0.8, 0.8)}


def test_small_budget_samples_the_grid_spread_out() -> None:
    firsts = [c.genome[0] for c in make(budget=5, points=5, densities=[0.5]).ask(5)]
    assert len(firsts) == 5 and firsts != sorted(firsts)


def test_values_outside_the_space_are_refused() -> None:
    with pytest.raises(ValueError, match="search.params.densities"):
        make(densities=[0.05])


@pytest.mark.parametrize("stop_after", [1, 7])
def test_resume_follows_the_same_trajectory(stop_after: int) -> None:
    assert trajectory(resumed_run(make, WORKER, stop_after)) == trajectory(Loop(make(), WORKER).run())


def test_grid_values_default_to_even_spacing() -> None:
    genomes = np.array([c.genome for c in make(points=4, densities=[1.0]).ask(4)])
    assert sorted(genomes[:, 0]) == pytest.approx([0, 1 / 3, 2 / 3, 1])
