"""The RMM strategy behind ask/tell: learning, DAR order, reward cache, budget and finals, resume."""

import json
from typing import Any

import numpy as np
import pytest
import torch

from search.base import Candidate, Result, make_strategy
from search.rmm.dar import DynamicAverageReward
from search.rmm.env import MergeMapEnv
from search.strategies.rmm import RMM
from tests.search.synthetic import Loop, make_space
from workers.recipe import canonical_hash

LAYERS = 4


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def e0_fraction(recipe: dict[str, Any]) -> float:
    """Synthetic fitness: the share of output layers copied from expert e0 (1.0 = every layer, depth ≥ L)."""
    layers = recipe["layers"]
    copies = sum(1 for layer in layers if layer["op"] == "copy" and layer["params"]["model"] == "e0")
    return copies / max(len(layers), LAYERS)


class Worker:
    """Scores candidates with `e0_fraction`; `fail_every` fails every n-th candidate number."""

    def __init__(self, fail_every: int = 0) -> None:
        self.fail_every = fail_every

    def __call__(self, candidate: Candidate) -> Result:
        if self.fail_every and candidate.number % self.fail_every == self.fail_every - 1:
            return Result(candidate.number, float("nan"), failed=True, error="synthetic failure")
        return Result(candidate.number, e0_fraction(candidate.recipe))


def make(budget: int = 40, seed: int = 0, **params: Any) -> RMM:
    strategy = make_strategy("rmm", make_space(layers=LAYERS, experts=3), budget, seed, params)
    assert isinstance(strategy, RMM)
    return strategy


class LaggingDriver:
    """Asks `ask_n` at a time but tells only the `tell_n` oldest pending (in reverse order), so some
    candidates stay in flight across asks, as with workers that finish at different times."""

    def __init__(self, strategy: RMM, worker: Worker, ask_n: int = 3, tell_n: int = 2) -> None:
        self.strategy, self.worker, self.ask_n, self.tell_n = strategy, worker, ask_n, tell_n
        self.pending: list[Candidate] = []
        self.asked: list[Candidate] = []

    def step(self) -> None:
        new = self.strategy.ask(self.ask_n)
        self.asked += new
        self.pending += new
        assert self.pending, "strategy asked for nothing while not done"
        told, self.pending = self.pending[: self.tell_n], self.pending[self.tell_n :]
        self.strategy.tell([self.worker(c) for c in reversed(told)])

    def run(self) -> "LaggingDriver":
        while not self.strategy.done():
            self.step()
        return self


def as_json(candidates: list[Candidate]) -> list[dict[str, Any]]:
    return [json.loads(json.dumps(c.to_json())) for c in candidates]


def test_learns_to_copy_expert_0_within_a_small_budget() -> None:
    strategy = make(budget=100)
    loop = Loop(strategy, Worker(), batch=4).run()
    fitness = {r.number: r.fitness for r in loop.results}
    training = [fitness[c.number] for c in loop.asked if not c.info.get("final")]
    first, last = np.mean(training[:20]), np.mean(training[-20:])
    assert last > first + 0.3, (first, last)
    final = [c for c in loop.asked if c.info.get("final")]
    assert final[0].info["role"] == "policy" and fitness[final[0].number] >= 0.75
    assert strategy.best_seen()["fitness"] == 1.0


def test_rewards_are_smoothed_in_episode_order_even_when_told_out_of_order(monkeypatch: Any) -> None:
    strategy = make(budget=40, data_scale=0.25)
    trained: list[tuple[list[int], float]] = []
    real_train = strategy.agent.train

    def spy(batch: list[Any]) -> dict[str, float]:
        trained.extend((trajectory.actions, reward) for trajectory, reward in batch)
        return real_train(batch)

    monkeypatch.setattr(strategy.agent, "train", spy)
    LaggingDriver(strategy, Worker()).run()

    # Replay every trained episode in order, score it, and smooth independently with the chunk it had.
    env = MergeMapEnv.from_config(strategy.env.config())
    dar = DynamicAverageReward(0.8, t_max=strategy.num_episodes, data_scale=0.25)
    assert len(trained) == strategy.started
    for index, (actions, reward) in enumerate(trained):
        env.reset()
        for action in actions:
            info = env.step(action)[4]
        assert reward == pytest.approx(dar.update(100 * e0_fraction(info["recipe"]), index % 4))


def test_candidates_cycle_chunks_respect_the_budget_and_end_with_finals() -> None:
    strategy = make(budget=30, data_scale=0.2)
    driver = LaggingDriver(strategy, Worker()).run()
    assert strategy.asked == len(driver.asked) <= 30 and strategy.told == strategy.asked
    assert [c.number for c in driver.asked] == list(range(len(driver.asked)))
    training = [c for c in driver.asked if not c.info.get("final")]
    finals = [c for c in driver.asked if c.info.get("final")]
    assert all(c.subset == c.info["episode"] % 5 for c in training)
    assert [c.info["episode"] for c in training] == sorted({c.info["episode"] for c in training})
    assert 1 <= len(finals) <= 2 and driver.asked[-len(finals) :] == finals
    assert all(c.subset == -1 for c in finals) and finals[0].info == {"final": True, "role": "policy"}
    assert strategy.done() and strategy.ask(4) == []


def test_the_cache_answers_repeats_without_asking_and_keeps_only_measurements() -> None:
    # One expert, no operators, two layers: few distinct maps, so repeats on a chunk are certain.
    space = make_space(layers=2, experts=1)
    strategy = make_strategy("rmm", space, 30, 0, {"operators": [], "data_scale": 0.5})
    driver = LaggingDriver(strategy, Worker(fail_every=4)).run()
    training = [c for c in driver.asked if not c.info.get("final")]
    keys = [f"{canonical_hash(c.recipe)}:{c.subset}" for c in training]
    assert strategy.started > len(training)  # some episodes were answered from the cache, unasked
    measured = {k for k, c in zip(keys, training) if c.number % 4 != 3}
    assert set(strategy.cache) == measured  # failures are never cached
    for key in set(keys):  # a (recipe, chunk) is asked again only after its evaluation failed
        numbers = [c.number for k, c in zip(keys, training) if k == key]
        assert all(number % 4 == 3 for number in numbers[:-1])


def test_without_the_cache_every_training_episode_is_asked() -> None:
    strategy = make(budget=24, reward_cache=False)
    driver = LaggingDriver(strategy, Worker()).run()
    training = [c for c in driver.asked if not c.info.get("final")]
    assert len(training) == strategy.started == 22


def test_resume_with_candidates_in_flight_asks_the_same_candidates() -> None:
    def run(checkpoint: bool) -> list[dict[str, Any]]:
        driver = LaggingDriver(make(budget=36, seed=3, data_scale=0.25), Worker(fail_every=5))
        resumed = False
        while not driver.strategy.done():
            driver.step()
            strategy = driver.strategy
            in_flight = any(e.fitness is None for e in strategy.waiting)
            if checkpoint and not resumed and in_flight and strategy.batch and strategy.agent.updates:
                state = json.loads(json.dumps(strategy.state_dict()))
                driver.strategy = make(budget=36, seed=3, data_scale=0.25)
                driver.strategy.load_state_dict(state)
                resumed = True
        assert resumed or not checkpoint
        return as_json(driver.asked)

    assert run(checkpoint=True) == run(checkpoint=False)


def test_seeded() -> None:
    assert as_json(make(seed=5).ask(3)) == as_json(make(seed=5).ask(3))
    assert as_json(make(seed=5).ask(3)) != as_json(make(seed=6).ask(3))


def test_a_result_that_is_not_awaited_is_refused() -> None:
    strategy = make()
    (candidate,) = strategy.ask(1)
    strategy.tell([Result(candidate.number, 0.5)])
    with pytest.raises(ValueError, match=f"candidate {candidate.number} is not awaited"):
        strategy.tell([Result(candidate.number, 0.5)])


@pytest.mark.parametrize(
    ("budget", "params", "where"),
    [
        (2, {}, "search.budget"),
        (40, {"min_depth": 5}, "search.params.min_depth"),
        (40, {"data_scale": 0.0}, "search.params.data_scale"),
        (40, {"ppo": {"n_epochs": 0}}, "search.params.ppo.n_epochs"),
        (40, {"learning_rate": 1e-3}, "search.params.learning_rate"),
    ],
)
def test_bad_settings_raise_one_line_naming_the_field(
    budget: int, params: dict[str, Any], where: str
) -> None:
    with pytest.raises(ValueError) as err:
        make(budget=budget, **params)
    assert str(err.value).startswith(where) and "\n" not in str(err.value)


def test_repeats_of_an_architecture_in_flight_wait_for_it_and_cap_the_roll() -> None:
    # One layer, one expert, no operators: every episode builds the same map, on the one chunk.
    space = make_space(layers=1, experts=1)
    strategy = make_strategy("rmm", space, 10, 0, {"operators": [], "data_scale": 1.0})
    (first,) = strategy.ask(5)
    assert strategy.started == 5 and first.subset == 0  # four repeats wait on the one evaluation
    strategy.tell([Result(first.number, 0.25)])
    assert strategy.agent.updates == 1 and strategy.history[0]["fitness"] == 0.25
    (final,) = strategy.ask(5)  # the last three episodes come from the cache; the policy is the best seen
    assert strategy.started == 8 and strategy.agent.updates == 2
    assert final.subset == -1 and final.recipe == first.recipe and final.info["role"] == "policy"
    strategy.tell([Result(final.number, 0.3)])
    assert strategy.done() and strategy.asked == 2


@pytest.mark.slow
def test_learns_a_layer_dependent_map_on_eight_layers() -> None:
    """Best map: e0 copies in the lower half, TIES in the upper half (about 40 s on one core)."""

    def wanted(layer: dict[str, Any]) -> bool:
        return layer["op"] == "ties" if layer["from"] >= 4 else layer["params"].get("model") == "e0"

    def halves(candidate: Candidate) -> Result:
        layers = candidate.recipe["layers"]
        return Result(candidate.number, sum(map(wanted, layers)) / max(len(layers), 8))

    strategy = make_strategy("rmm", make_space(layers=8, experts=3), 300, 0, {})
    loop = Loop(strategy, halves, batch=8).run()
    fitness = {r.number: r.fitness for r in loop.results}
    training = [fitness[c.number] for c in loop.asked if not c.info.get("final")]
    assert np.mean(training[-40:]) > np.mean(training[:40]) + 0.4
    policy = next(c for c in loop.asked if c.info.get("role") == "policy")
    assert fitness[policy.number] >= 0.875
