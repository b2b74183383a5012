import numpy as np
import pytest

from search.base import make_strategy
from tests.search.synthetic import Loop, SyntheticWorker, make_space, resumed_run, trajectory

WORKER = SyntheticWorker(layers=4, experts=3, fail_every=7)


def make(seed: int = 1, budget: int = 30, **params: object):
    return make_strategy("random", make_space(), budget, seed, dict(params))


def test_genomes_in_bounds_and_budget_respected() -> None:
    strategy = make()
    lo, hi = strategy.space.bounds()
    loop = Loop(strategy, WORKER, batch=8).run()
    assert len(loop.asked) == 30 and strategy.done() and strategy.ask(5) == []
    for c in loop.asked:
        assert len(c.genome) == strategy.space.dim
        assert all(a <= g <= b for g, a, b in zip(c.genome, lo, hi))
    assert len({c.number for c in loop.asked}) == 30


def test_dirichlet_weights_sum_to_scale_per_block() -> None:
    genome = np.array(make(w_scale=0.8).ask(1)[0].genome).reshape(4, 6)  # layers × (3 weights, 3 densities)
    assert np.allclose(genome[:, :3].sum(1), 0.8)


def test_uniform_weights_and_density_range() -> None:
    genome = np.array(make(weights="uniform", d_min=0.3, d_max=0.5).ask(1)[0].genome).reshape(4, 6)
    assert not np.allclose(genome[:, :3].sum(1), genome[0, :3].sum())
    assert ((genome[:, 3:] >= 0.3) & (genome[:, 3:] <= 0.5)).all()


def test_seeded() -> None:
    assert make(seed=3).ask(4) == make(seed=3).ask(4)
    assert make(seed=3).ask(1)[0].genome != make(seed=4).ask(1)[0].genome


@pytest.mark.parametrize("stop_after", [1, 12, 29])
def test_resume_follows_the_same_trajectory(stop_after: int) -> None:
    full = Loop(make(), WORKER).run()
    assert trajectory(resumed_run(make, WORKER, stop_after)) == trajectory(full)


@pytest.mark.parametrize(
    ("params", "field"),
    [({"w_scale": 0}, "w_scale"), ({"weights": "normal"}, "weights"), ({"bogus": 1}, "bogus")],
)
def test_bad_params_raise_one_line_naming_the_field(params: dict, field: str) -> None:
    with pytest.raises(ValueError) as err:
        make(**params)
    assert f"search.params.{field}" in str(err.value) and "\n" not in str(err.value)


def test_empty_density_range_is_refused() -> None:
    with pytest.raises(ValueError, match="d_min"):
        make(d_min=0.5, d_max=0.4)
