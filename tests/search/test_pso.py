import numpy as np
import pytest

from search.base import make_strategy
from search.strategies.pso import PSOParams, pso_step
from tests.search.synthetic import (
    Loop,
    QuadraticWorker,
    SyntheticWorker,
    make_space,
    resumed_run,
    trajectory,
)
from workers.operators import check_recipe
from workers.recipe import Recipe

WORKER = SyntheticWorker(layers=4, experts=3, fail_every=10)


def make(seed: int = 1, budget: int = 49, granularity: str = "layer", **params: object):
    return make_strategy("pso", make_space(granularity=granularity), budget, seed, dict(params))


def test_worked_example_1d() -> None:
    # ALGORITHMS.md §5: x = 0.5, v = 0, pbest = 0.7, gbest = 1.0, r1 = 0.5, r2 = 0.25 → v = 0.45, x = 0.95.
    x, v = pso_step(*np.array([[0.5], [0.0], [0.7], [1.0]]), r1=0.5, r2=0.25, params=PSOParams())
    assert v == pytest.approx([0.45]) and x == pytest.approx([0.95])


def test_velocity_is_clamped_and_walls_reflect() -> None:
    params = PSOParams()  # bounds [-0.5, 1.5], |v| ≤ 1.0
    x, v = pso_step(np.array([1.2]), np.array([0.0]), np.array([1.2]), np.array([3.0]), 0.5, 1.0, params)
    # raw v = 2·1·1.8 = 3.6 → clamped to 1.0; 1.2 + 1.0 = 2.2 reflects at 1.5 to 0.8, moving back.
    assert x == pytest.approx([0.8]) and v == pytest.approx([-1.0])


def test_initial_swarm_is_the_basis_and_recipes_are_dare_affine() -> None:
    strategy = make()
    first = strategy.ask(100)
    assert len(first) == 7 and strategy.ask(1) == []  # 2N + 1 particles, barrier per iteration
    genomes = np.array([c.genome for c in first]).reshape(7, 4, 7)  # particles × groups × (α_0, 2N)
    assert (genomes == np.eye(7)[:, None, :]).all()
    layer = first[5].recipe["layers"][2]
    assert layer["op"] == "dare_affine"
    assert layer["params"] == {"dense": [0, 0, 0], "sparse": [0, 1, 0], "density": pytest.approx(0.2)}
    for c in first:
        check_recipe(Recipe.parse(c.recipe), n_source_layers=4)


def test_affine_constraint_bounds_and_one_recipe_seed() -> None:
    loop = Loop(make(budget=70), WORKER, batch=7).run()
    seeds = set()
    for c in loop.asked:
        alpha = np.array(c.genome).reshape(4, 7)
        assert np.allclose(alpha.sum(1), 1.0)
        assert (alpha[:, 1:] >= -0.5 - 1e-12).all() and (alpha[:, 1:] <= 1.5 + 1e-12).all()
        for layer, row in zip(c.recipe["layers"], alpha):
            free = layer["params"]["dense"] + layer["params"]["sparse"]
            assert free == pytest.approx(row[1:].tolist(), abs=1e-6)
        seeds.add(c.recipe["seed"])
    assert len(seeds) == 1
    assert len(loop.asked) == 70 and loop.strategy.done()


def test_global_granularity_uses_one_alpha_for_every_layer() -> None:
    loop = Loop(make(budget=21, granularity="global"), WORKER, batch=7).run()
    last = loop.asked[-1]
    assert len(last.genome) == 7
    assert all(layer["params"] == last.recipe["layers"][0]["params"] for layer in last.recipe["layers"])


def test_gbest_is_the_best_told_candidate() -> None:
    worker = SyntheticWorker(layers=4, experts=3)
    loop = Loop(make(budget=35), worker, batch=7).run()
    best = max(loop.results, key=lambda r: r.fitness)
    assert loop.strategy.gbest_number == best.number and loop.strategy.gbest_fitness == best.fitness


def test_failed_particles_do_not_crash_or_win() -> None:
    worker = SyntheticWorker(layers=4, experts=3, fail_every=2)
    loop = Loop(make(budget=28), worker, batch=7).run()
    assert loop.strategy.gbest_number % 2 == 0  # odd numbers fail


def test_seeded() -> None:
    def run(seed: int) -> list[dict]:
        return trajectory(Loop(make(seed=seed, budget=21), WORKER, batch=7).run())

    assert run(3) == run(3) and run(3)[7:] != run(4)[7:]  # iteration 0 is the basis for every seed


@pytest.mark.parametrize("stop_after", [1, 7, 10, 48])
def test_resume_follows_the_same_trajectory(stop_after: int) -> None:
    full = Loop(make(), WORKER).run()
    assert trajectory(resumed_run(make, WORKER, stop_after)) == trajectory(full)


def test_bad_bounds_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="low 1.0 must be below high 0.0") as err:
        make(low=1.0, high=0.0)
    assert "\n" not in str(err.value)


def test_layer_groups_move_apart_only_with_group_draws() -> None:
    def last_alpha(draws: str) -> np.ndarray:
        loop = Loop(make(budget=21, draws=draws), WORKER, batch=7).run()
        return np.array(loop.asked[-1].genome).reshape(4, 7)

    assert not np.allclose(last_alpha("group"), last_alpha("group")[0])
    assert np.allclose(last_alpha("particle"), last_alpha("particle")[0])


def test_beats_random_over_the_same_coefficient_box() -> None:
    # Random draws each expert's coefficient U[-0.5, 1.5]: the box PSO's dense coefficients live in.
    worker = QuadraticWorker(layers=4, experts=3)
    space = make_space(op="task_arithmetic", weight_range=(-0.5, 1.5))

    def best(name: str, seed: int, **params: object) -> float:
        return Loop(make_strategy(name, space, 70, seed, params), worker, batch=7).run().best()

    seeds = range(6)
    pso_best = np.mean([best("pso", s) for s in seeds])
    random_best = np.mean([best("random", s, weights="uniform") for s in seeds])
    assert pso_best > random_best + 0.05, (pso_best, random_best)
