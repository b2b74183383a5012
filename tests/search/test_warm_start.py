"""Warm starts from the references, the default space, and RMM's default pool."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from search.base import Reference, Result, StrategyBase, expressible, make_strategy
from search.space import SearchSpace, SpaceSpec
from tests.search.synthetic import Loop, SyntheticWorker, make_space, trajectory
from workers.operators import check_recipe
from workers.recipe import FORMAT, Recipe

EXPERTS = ["e0", "e1", "e2"]


def whole(op: str, params: dict[str, Any], layers: int = 4) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "models": {"base": "base", "experts": EXPERTS},
        "layers": [{"from": i, "op": op, "params": params} for i in range(layers)],
        "rest": {"op": op, "params": params},
        "seed": 7,
    }


def references(uniform: float = 0.7) -> list[Reference]:
    """The driver's references with made-up scores: the uniform average is the best."""
    recipes = {
        "base": whole("copy", {"model": "base"}),
        **{f"expert:{e}": whole("copy", {"model": e}) for e in EXPERTS},
        "uniform": whole("linear", {"weights": [1.0] * 3}),
        "task_arithmetic": whole("task_arithmetic", {"weights": [1.0] * 3, "lambda": 0.3}),
        "ties": whole("ties", {"weights": [1.0] * 3, "density": 0.2}),
    }
    fitness = {"base": 0.5, "expert:e0": 0.4, "expert:e1": 0.3, "expert:e2": 0.2, "uniform": uniform,
               "task_arithmetic": 0.6, "ties": 0.65}
    return [
        Reference(name, recipe, Result(-1 - i, fitness[name], per_example={"x": [fitness[name]] * 4}))
        for i, (name, recipe) in enumerate(recipes.items())
    ]


def test_expressible_references_and_their_coefficients() -> None:
    space = make_space(op="task_arithmetic")
    found = {r.name: c for r, c in expressible(references(), space)}
    assert "ties" not in found  # a TIES merge has no task-vector coefficients
    assert found["base"] == [0.0] * 3 and found["expert:e1"] == [0.0, 1.0, 0.0]
    assert found["uniform"] == pytest.approx([1 / 3] * 3) and found["task_arithmetic"] == pytest.approx([0.3] * 3)
    assert next(r.name for r, _ in expressible(references(), space)) == "uniform"  # best first


def test_default_space_is_global_unnormalised_task_arithmetic_and_decodes_to_valid_recipes() -> None:
    space = SearchSpace(SpaceSpec(), 4, "base", EXPERTS, seed=3)
    assert space.dim == 3 and space.bounds() == ([0.0] * 3, [1.2] * 3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        genome = rng.uniform(0, 1.2, 3).round(6).tolist()
        recipe = space.decode(genome)
        check_recipe(Recipe.parse(recipe), n_source_layers=4)
        assert space.coefficients_of(recipe) == pytest.approx(genome)  # θ_base + Σ w_i δ_i, unnormalised
    for options in ({"granularity": "layer"}, {"granularity": "layer", "modules": True}):
        space = SearchSpace(SpaceSpec(**options), 4, "base", EXPERTS)
        check_recipe(Recipe.parse(space.decode(space.center())), n_source_layers=4)


def test_cmaes_mean_starts_at_the_best_expressible_reference() -> None:
    space = SearchSpace(SpaceSpec(), 4, "base", EXPERTS)
    strategy = make_strategy("cmaes", space, 20, 0)
    strategy.warm_start(references())
    assert strategy.es.mean == pytest.approx([1 / 3] * 3)
    assert strategy.ask(1)[0].generation == 0


def test_a_warm_started_cmaes_resumes_on_its_own_trajectory() -> None:
    """The warm start's mean is in the checkpoint: the driver does not warm-start a resumed job again, and a
    replay from the space's center would diverge."""
    worker = SyntheticWorker(layers=4, experts=3)

    def fresh() -> StrategyBase:
        return make_strategy("cmaes", SearchSpace(SpaceSpec(), 4, "base", EXPERTS), 40, 0)

    def warm() -> StrategyBase:
        strategy = fresh()
        strategy.warm_start(references(uniform=0.1))  # task arithmetic at 0.3 each: off the space's center
        return strategy

    full = Loop(warm(), worker, 5).run()
    loop = Loop(warm(), worker, 5).run(max_told=13)
    state = json.loads(json.dumps(loop.strategy.state_dict(), allow_nan=False))
    loop.strategy = fresh()
    loop.strategy.load_state_dict(state)
    assert trajectory(loop.run()) == trajectory(full)
    assert trajectory(Loop(fresh(), worker, 5).run()) != trajectory(full)


def test_pso_reuses_base_and_expert_scores_and_adds_the_best_merge() -> None:
    strategy = make_strategy("pso", make_space(op="task_arithmetic"), 40, 0)
    strategy.warm_start(references())
    generation0 = strategy.ask(40)
    particles = [c.info["particle"] for c in generation0]
    assert particles == [4, 5, 6]  # the DARE experts; base (0) and experts (1-3) were scored as references
    assert strategy.particles == 8 and strategy.x[7, 0] == pytest.approx([1 / 3] * 3 + [0.0] * 3)
    assert strategy.gbest_fitness == 0.7 and strategy.gbest_number == -5
    strategy.tell([Result(c.number, 0.1) for c in generation0])
    assert len(strategy.ask(40)) == 8  # from generation 1 on, every particle moves


def test_sae_archive_holds_the_references_and_generation0_skips_them() -> None:
    strategy = make_strategy("sae", make_space(op="task_arithmetic"), 60, 0)
    strategy.warm_start(references())
    assert sorted(m.number for m in strategy.archive) == [-6, -5, -4, -3, -2, -1]
    generation0 = strategy.ask(60)
    dense = [c for c in generation0 if c.genome[-1] == 1.0]
    assert dense == []  # base and the dense experts are in the archive already
    assert len(generation0) == 3 * 3  # each expert at the three initial sparsities


def test_sae_without_references_starts_with_the_base() -> None:
    strategy = make_strategy("sae", make_space(op="task_arithmetic"), 60, 0)
    generation0 = strategy.ask(60)
    assert generation0[0].genome == [0.0] * 12 + [1.0] and generation0[0].info["expert"] is None


def test_rmm_default_pool_and_the_best_static_merge() -> None:
    space = make_space(op="task_arithmetic")
    strategy = make_strategy("rmm", space, 20, 0)
    assert strategy.env.action_labels == [
        *EXPERTS, "base", "task_arithmetic λ=0.5", "task_arithmetic λ=1.0", "task_arithmetic λ=2.0", "skip", "back"]
    assert strategy.env.fixed_depth and strategy.env.rest.params["model"] == "base"  # a shallow model; base carrier
    strategy.warm_start(references())  # uniform is best: it equals task arithmetic at λ = 1, already pooled
    assert len(strategy.env.operators) == 4
    strategy.warm_start(references(uniform=0.1))  # now TIES is the best static merge: it joins the pool
    assert strategy.env.operators[-1].op == "ties" and len(strategy.env.operators) == 5
    state = strategy.state_dict()
    again = make_strategy("rmm", space, 20, 0)
    again.load_state_dict(state)
    assert again.env.config() == strategy.env.config()
    deep = make_strategy("rmm", make_space(op="task_arithmetic", layers=12), 20, 0)
    assert not deep.env.fixed_depth


def test_sae_split_crossover_gives_per_layer_lambda() -> None:
    strategy = make_strategy("sae", make_space(op="task_arithmetic"), 60, 0, {"crossover": "split"})
    first = strategy.ask(60)
    strategy.tell([Result(c.number, 0.1 + 0.01 * c.number, per_example={"x": [0.5]}) for c in first])
    children = strategy.ask(60)
    lambdas = [np.array(c.info["lambda"]) for c in children]
    assert all(set(np.round(lam, 6)) <= {round(lam[0], 6), round(1 - lam[0], 6)} for lam in lambdas)
    assert any(len(set(np.round(lam, 6))) == 2 for lam in lambdas)  # λ differs across layers
