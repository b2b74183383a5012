import numpy as np
import pytest

from search.base import Result, make_strategy
from search.strategies.sae import (
    Member,
    attraction,
    crossover_ratio,
    shared_fitness,
    sparsity_schedule,
)
from tests.search.synthetic import Loop, SyntheticWorker, make_space, resumed_run, trajectory
from workers.operators import check_recipe
from workers.recipe import Recipe

WORKER = SyntheticWorker(layers=4, experts=3, fail_every=11)


def make(seed: int = 1, budget: int = 60, **params: object):
    return make_strategy("sae", make_space(op="task_arithmetic"), budget, seed, dict(params))


def member(number: int, coefficients: list[float], fitness: float, sparsity: float = 0.0) -> Member:
    """An archive member uniform over the 4 layers, scored on chunk 0 with one example."""
    return Member(number, [coefficients] * 4, 1.0, fitness, sparsity, subset=0, scores=[fitness])


def test_schedule_matches_the_worked_list() -> None:
    # ALGORITHMS.md §4.2: s_min 0.1, s_max 0.6, T0 3, T_mult 2, t = 0..11 (cycles of 3, 6, then 12 truncated).
    expected = [0.100, 0.350, 0.600, 0.100, 0.148, 0.273, 0.427, 0.552, 0.600, 0.100, 0.110, 0.140]
    assert [sparsity_schedule(t, 0.1, 0.6, 3, 2) for t in range(12)] == pytest.approx(expected, abs=5e-4)


def test_schedule_edge_cases() -> None:
    assert [sparsity_schedule(t, 0.1, 0.6, 1, 1) for t in range(3)] == [0.1, 0.1, 0.1]  # one-step cycles
    assert sparsity_schedule(1, 0.05, 0.9, 2, 1) == pytest.approx(0.9)  # cycle end reaches s_max


def test_m2n2_worked_example() -> None:
    # §4.1: A = [1,1,0,0], B = [0,0,1,1], C = [1,1,1,0] → z = [2,2,2,1], f = (1.0, 1.5, 1.5);
    # with parent 1 = A, attraction(B) = 1.5, attraction(C) = 0.5, so P(B) = 0.75, P(C) = 0.25.
    scores = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 0]], float)
    z, f = shared_fitness(scores, alpha=1.0)
    assert z.tolist() == [2, 2, 2, 1] and f.tolist() == [1.0, 1.5, 1.5]
    pull = attraction(scores, z, parent=0)
    assert pull.tolist() == [0.0, 1.5, 0.5] and (pull / pull.sum()).tolist() == [0, 0.75, 0.25]
    assert shared_fitness(scores, alpha=0.0)[1].tolist() == [2, 2, 3]  # ga mode: plain accuracy


def test_sharing_across_chunks_estimates_z_from_those_scored() -> None:
    # Two members scored on chunk 0, one on chunk 1 (NaN elsewhere); N = 3 scales each column's mean.
    nan = np.nan
    scores = np.array([[1, 0, nan, nan], [1, 1, nan, nan], [nan, nan, 1, 0]])
    z, f = shared_fitness(scores, alpha=1.0)
    assert z.tolist() == [3, 1.5, 3, 1] and f == pytest.approx([1 / 3, 1 / 3 + 1 / 1.5, 1 / 3])
    assert attraction(scores, z, parent=2).tolist() == [0, 0, 0]  # no shared examples, no attraction


def test_lambda_worked_example_through_a_crossover() -> None:
    # §4.2: s_A = 0.62, s_B = 0.48, ω_A = 0.30, ω_B = 0.10 → λ = 0.92/1.50 = 0.6133;
    # at θ_A = 0, θ_B = 0.8 the child is 0.309.
    lam = crossover_ratio(0.62, np.array([0.30]), 0.48, np.array([0.10]))
    assert lam == pytest.approx([0.6133], abs=1e-4)
    assert crossover_ratio(0.0, np.array([0.0]), 0.0, np.array([0.0])).tolist() == [0.5]
    strategy = make(offspring=1)
    strategy.archive = [member(0, [0.0, 1.0, 0.0], 0.62, 0.30), member(1, [0.8, 0.0, 0.2], 0.48, 0.10)]
    strategy.generation = 1
    (child,) = strategy.breed(first_number=12)
    assert child.genome[0] == pytest.approx(0.309, abs=5e-4)
    lam_a = np.array(child.info["lambda"]) if child.parents == [0, 1] else 1 - np.array(child.info["lambda"])
    assert lam_a == pytest.approx([0.6133] * 4, abs=1e-4)  # λ is the first parent's share
    assert sorted(child.parents) == [0, 1] and child.generation == 1 and child.subset == 1
    assert child.genome[-1] == pytest.approx(1 - 0.1)  # mutation: density 1 − s(0)


def test_initial_population_is_the_base_and_dense_and_pruned_experts() -> None:
    base, *first = make().ask(100)
    assert len(first) == 12 and make().generation_barrier  # the base, 3 experts × (dense + 3 pruned)
    assert base.genome == [0.0] * 12 + [1.0]
    densities = [c.genome[-1] for c in first]
    assert densities[:4] == pytest.approx([1.0, 0.9, 0.65, 0.4])
    for c in first:
        coefficients = np.array(c.genome[:-1]).reshape(4, 3)
        assert ((coefficients == 0) | (coefficients == 1)).all() and (coefficients.sum(1) == 1).all()
        assert c.parents == [] and c.subset == 0
        layer = c.recipe["layers"][0]
        assert layer["op"] == "magnitude_prune" and layer["params"]["scope"] == "merged"
        check_recipe(Recipe.parse(c.recipe), n_source_layers=4)


def test_children_are_convex_mixes_of_their_parents_on_fresh_chunks() -> None:
    loop = Loop(make(budget=80), WORKER, batch=6).run()
    by_number = {c.number: c for c in loop.asked}
    children = [c for c in loop.asked if c.generation > 0]
    assert children and {c.subset for c in children} == {c.generation for c in children}
    for c in children:
        a, b = (np.array(by_number[p].genome[:-1]) for p in c.parents)
        lam = np.repeat(c.info["lambda"], 3)
        assert np.allclose(c.genome[:-1], lam * a + (1 - lam) * b, atol=1e-5)
        assert c.genome[-1] == pytest.approx(1 - c.info["target_sparsity"], abs=1e-6)
        assert c.parents[0] != c.parents[1]
    assert len(loop.asked) == 80 and loop.strategy.done()


def test_competition_replaces_the_weakest_unless_the_child_is() -> None:
    strategy = make(archive_size=2, alpha=0.0, beta_f=0.1)
    strategy.archive = [member(0, [1, 0, 0], 0.5), member(1, [0, 1, 0], 0.7)]
    strategy.compete(member(2, [0, 0, 1], 0.45, sparsity=0.6))  # F = 0.45 + 0.06 beats 0.5
    assert [m.number for m in strategy.archive] == [2, 1]
    strategy.compete(member(3, [0, 0, 1], 0.4))  # the lowest: dropped
    assert [m.number for m in strategy.archive] == [2, 1]


def test_failed_children_never_enter_the_archive() -> None:
    worker = SyntheticWorker(layers=4, experts=3, fail_every=2)
    loop = Loop(make(budget=60), worker, batch=6).run()
    failed = {r.number for r in loop.results if r.failed}
    assert failed and not failed & {m.number for m in loop.strategy.archive}


def test_random_pairing_pairs_each_member_once_per_generation() -> None:
    strategy = make(pairing="random")
    strategy.archive = [member(i, [1, 0, 0], 0.5) for i in range(8)]
    strategy.generation = 1
    parents = [p for c in strategy.breed(first_number=0) for p in c.parents]
    assert sorted(parents) == list(range(8))


def test_seeded() -> None:
    def run(seed: int) -> list[dict]:
        return trajectory(Loop(make(seed=seed, budget=40), WORKER).run())

    assert run(3) == run(3) and run(3)[13:] != run(4)[13:]  # generation 0 is the same for every seed


def test_barrier_holds_the_next_generation_until_told() -> None:
    strategy = make()
    first = strategy.ask(100)
    assert len(first) == 13 and strategy.ask(1) == []
    strategy.tell([WORKER(c) for c in first[1:]])
    assert strategy.ask(1) == []
    strategy.tell([WORKER(first[0])])
    assert strategy.ask(1)[0].generation == 1


@pytest.mark.parametrize("stop_after", [1, 12, 17, 59])
def test_resume_follows_the_same_trajectory(stop_after: int) -> None:
    full = Loop(make(), WORKER).run()
    assert trajectory(resumed_run(make, WORKER, stop_after)) == trajectory(full)


def test_bad_schedule_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="s_min 0.7 must not exceed s_max 0.6") as err:
        make(s_min=0.7)
    assert "\n" not in str(err.value)


def test_beats_random_on_complementary_specialists() -> None:
    # M2N2's premise: two experts each strong on one task, four distractors; the best merge mixes the two.
    targets = np.zeros((2, 6))
    targets[0, :2], targets[1, :2] = [0.8, 0.4], [0.4, 0.8]
    worker = SyntheticWorker(layers=4, experts=6, targets=targets)

    def best(name: str, seed: int) -> float:
        space = make_space(op="task_arithmetic", experts=6)
        return Loop(make_strategy(name, space, 96, seed), worker, batch=12).run().best()

    seeds = range(4)
    sae_best = np.mean([best("sae", s) for s in seeds])
    random_best = np.mean([best("random", s) for s in seeds])
    assert sae_best > random_best + 0.1, (sae_best, random_best)


def test_results_without_per_example_scores_still_work() -> None:
    strategy = make(budget=30)
    while not strategy.done():
        batch = strategy.ask(6)
        strategy.tell([Result(c.number, fitness=float(c.genome[0])) for c in batch])
    assert len(strategy.archive) == 20
