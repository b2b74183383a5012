import json
import math

import cma
import numpy as np
import pytest

from search.base import Result, make_strategy
from search.strategies.cmaes import BLAS
from tests.search.synthetic import Loop, SyntheticWorker, make_space, resumed_run, trajectory

WORKER = SyntheticWorker(layers=4, experts=3, fail_every=9)


def make(seed: int = 1, budget: int = 60, **params: object):
    return make_strategy("cmaes", make_space(), budget, seed, dict(params))


def test_paper_popsize_bounds_and_budget() -> None:
    strategy = make()
    assert strategy.popsize == 4 + math.floor(3 * math.log(24))  # 4 layers × (3 weights + 3 densities)
    lo, hi = strategy.space.bounds()
    loop = Loop(strategy, WORKER, batch=8).run()
    assert len(loop.asked) == 60 and strategy.done() and strategy.ask(4) == []
    for c in loop.asked:
        assert all(a <= g <= b for g, a, b in zip(c.genome, lo, hi))
    assert [c.generation for c in loop.asked] == [i // strategy.popsize for i in range(60)]


def test_first_generation_is_centred_with_a_sixth_of_the_range() -> None:
    genomes = np.array([c.genome for c in make(budget=600, popsize=200).ask(200)])
    center = np.array(make().space.center())
    lo, hi = map(np.array, make().space.bounds())
    assert np.abs(genomes.mean(0) - center).max() < 0.05
    assert np.allclose(genomes.std(0) / (hi - lo), 1 / 6, atol=0.04)


def test_barrier_holds_the_next_generation_until_told() -> None:
    strategy = make()
    first = strategy.ask(100)
    assert len(first) == strategy.popsize and strategy.ask(1) == []
    strategy.tell([WORKER(c) for c in first[:-1]])
    assert strategy.ask(1) == []
    strategy.tell([WORKER(first[-1])])
    assert strategy.ask(1)[0].generation == 1


def test_unawaited_result_is_refused() -> None:
    strategy = make()
    strategy.ask(3)
    with pytest.raises(ValueError, match="candidate 50"):
        strategy.tell([Result(number=50, fitness=0.0)])


def test_seeded_and_leaves_numpy_global_state_alone() -> None:
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    assert [c.genome for c in make(seed=2).ask(3)] == [c.genome for c in make(seed=2).ask(3)]
    assert make(seed=2).ask(1)[0].genome != make(seed=3).ask(1)[0].genome
    assert (np.random.get_state()[1] == before).all()


@pytest.mark.parametrize("stop_after", [1, 13, 30, 59])
def test_resume_follows_the_same_trajectory(stop_after: int) -> None:
    full = Loop(make(), WORKER).run()
    assert trajectory(resumed_run(make, WORKER, stop_after)) == trajectory(full)


def test_beats_random_at_equal_budget() -> None:
    worker = SyntheticWorker(layers=4, experts=3)

    def best(name: str, seed: int) -> float:
        return Loop(make_strategy(name, make_space(), 156, seed), worker, batch=13).run().best()

    seeds = range(6)
    cma_best = np.mean([best("cmaes", s) for s in seeds])
    random_best = np.mean([best("random", s) for s in seeds])
    assert cma_best > random_best + 0.015, (cma_best, random_best)


def test_checkpoint_is_plain_json_data_and_refuses_old_pickles() -> None:
    strategy = make()
    Loop(strategy, WORKER, batch=8).run(max_told=30)
    state = json.loads(json.dumps(strategy.state_dict(), allow_nan=False))
    snapshot = json.loads(state["snapshot"])
    assert set(snapshot) == {"x0", "told_fitness"}
    assert all(isinstance(f, float) for generation in snapshot["told_fitness"] for f in generation)
    assert len(snapshot["told_fitness"]) == strategy.generation >= 1
    with pytest.raises(ValueError, match="told_fitness"):
        make().load_strategy_state({"es": "gASV..."})


def test_popsize_is_bounded() -> None:
    with pytest.raises(ValueError, match="popsize"):
        make(popsize=10**9)



def test_cma_runs_on_one_blas_thread_whatever_the_process_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy host's OpenBLAS threads made a D = 256 replay 15 times slower in CPU time: ask, tell and the
    replay on load run on one thread, and the process's own setting is left as it was."""

    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in BLAS.info() if lib["user_api"] == "blas"}

    if not blas_threads():
        pytest.skip("numpy's BLAS is not visible to threadpoolctl here")
    seen: list[set[int]] = []
    for method in ("ask", "tell"):
        original = getattr(cma.CMAEvolutionStrategy, method)

        def watched(self: cma.CMAEvolutionStrategy, *args: object, _original=original, **kwargs: object) -> object:
            seen.append(blas_threads())
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cma.CMAEvolutionStrategy, method, watched)
    with BLAS.limit(limits=2, user_api="blas"):
        strategy = make()
        Loop(strategy, WORKER, batch=8).run(max_told=16)
        make().load_state_dict(json.loads(json.dumps(strategy.state_dict())))
        assert len(seen) >= 4 and all(threads == {1} for threads in seen)
        assert blas_threads() == {2}
