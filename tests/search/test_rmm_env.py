"""MergeMapEnv (ALGORITHMS.md §6.5): count map, skip/back, masks, step cap, recipes, and the env checkers."""

import warnings
from typing import Any

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from search.rmm.env import MergeMapEnv
from workers.operators import check_recipe
from workers.recipe import OpSpec, Recipe

# Two experts, two operators: actions 0 = e0, 1 = e1, 2 = ties, 3 = dare, 4 = skip, 5 = back.
E0, E1, TIES, DARE, SKIP, BACK = range(6)


def make_env(layers: int = 4, **kwargs: Any) -> MergeMapEnv:
    return MergeMapEnv(layers, "base", ["e0", "e1"], **kwargs)


def mask_of(env: MergeMapEnv) -> list[int]:
    return np.flatnonzero(env.action_masks()).tolist()


def test_walkthrough_count_map_masks_observation_and_recipe() -> None:
    rewards: list[dict[str, Any]] = []
    env = make_env(reward_fn=lambda recipe: rewards.append(recipe) or 0.42, seed=11)
    obs, _ = env.reset()
    assert obs.shape == (4 * 4 + 4 + 2,) and obs.dtype == np.float32
    assert mask_of(env) == [E0, E1, TIES, DARE, SKIP]  # no back at layer 0

    # e0 at layer 0, skip layer 1, ties at layer 2, back to layer 2, e1 at layer 2, dare at layer 3.
    for action in (E0, SKIP, TIES, BACK, E1):
        obs, reward, terminated, truncated, _ = env.step(action)
        assert (reward, terminated, truncated) == (0.0, False, False)
        assert BACK in mask_of(env)
    assert (env.cur_pos, env.t) == (3, 5)
    assert obs[16:21].tolist() == [0, 0, 0, 1, 0] and obs[-1] == pytest.approx(5 / 8)

    obs, reward, terminated, truncated, info = env.step(DARE)
    assert (reward, terminated, truncated) == (0.42, True, False)
    assert obs[16:21].tolist() == [0, 0, 0, 0, 1] and mask_of(env) == []
    expected = np.zeros((4, 4))
    expected[0, E0] = expected[2, TIES] = expected[2, E1] = expected[3, DARE] = 1
    assert np.array_equal(env.count_map, expected) and np.array_equal(obs[:16], expected.ravel())

    recipe = info["recipe"]
    assert rewards == [recipe]
    assert recipe["layers"] == [
        {"from": 0, "op": "copy", "params": {"model": "e0"}},
        {"from": 2, "op": "ties", "params": {"weights": [1.0, 1.0], "density": 0.3, "lambda": 1.0}},
        {"from": 2, "op": "copy", "params": {"model": "e1"}},
        {"from": 3, "op": "dare", "params": {"weights": [1.0, 1.0], "density": 0.66}},
    ]
    assert recipe["rest"] == {"op": "ties", "params": {"weights": [1.0, 1.0], "density": 0.3, "lambda": 1.0}}
    assert recipe["seed"] == 11 and recipe["models"] == {"base": "base", "experts": ["e0", "e1"]}
    check_recipe(Recipe.parse(recipe), n_source_layers=4)  # every op and parameter is one the workers know
    with pytest.raises(RuntimeError, match="reset"):
        env.step(E0)


def test_back_is_masked_when_the_steps_left_could_not_reach_the_last_layer() -> None:
    env = make_env(layers=2)  # max_steps 4
    env.reset()
    env.step(E0)
    assert BACK in mask_of(env)  # 3 steps left, 1 layer ahead: back, then 2 forward
    env.step(BACK)
    env.step(E0)
    assert BACK not in mask_of(env)  # 1 step left: only forward actions remain
    assert env.step(E1)[2]


def test_skip_is_masked_until_min_depth_stays_reachable() -> None:
    env = make_env(layers=3, min_depth=3)
    env.reset()
    assert SKIP not in mask_of(env)
    env.step(E0)
    assert SKIP not in mask_of(env)
    env.step(BACK)
    env.step(E1)  # two blocks placed, one layer ahead after a skip: 3 reachable
    assert SKIP in mask_of(env)


def test_fixed_depth_masks_skip_and_back() -> None:
    env = make_env(fixed_depth=True)
    env.reset()
    for _ in range(3):
        assert mask_of(env) == [E0, E1, TIES, DARE]
        env.step(E1)


def test_a_masked_action_spends_a_step_and_the_step_cap_truncates() -> None:
    calls: list[dict[str, Any]] = []
    env = make_env(layers=2, reward_fn=lambda recipe: calls.append(recipe) or 1.0)
    env.reset()
    for _ in range(3):
        obs, reward, terminated, truncated, _ = env.step(BACK)  # masked at layer 0: nothing moves
        assert (env.cur_pos, reward, terminated, truncated) == (0, 0.0, False, False)
    obs, reward, terminated, truncated, info = env.step(BACK)
    assert (reward, terminated, truncated) == (0.0, False, True) and info == {} and calls == []
    assert not obs[:8].any() and mask_of(env) == []


def test_no_operators_gives_experts_only_and_an_expert_carrier() -> None:
    env = MergeMapEnv(3, "base", ["a", "b", "c"], operators=[])
    assert env.action_labels == ["a", "b", "c", "skip", "back"]
    assert env.rest.model_dump() == {"op": "copy", "params": {"model": "a"}}


def test_bad_min_depth_names_the_parameter() -> None:
    with pytest.raises(ValueError, match="min_depth"):
        make_env(layers=4, min_depth=5)


def test_config_round_trip_rebuilds_the_same_env() -> None:
    env = make_env(layers=3, min_depth=3, fixed_depth=True, seed=5)
    again = MergeMapEnv.from_config(env.config())
    assert again.config() == env.config() and again.action_labels == env.action_labels


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(1, 6),
    experts=st.integers(1, 3),
    operators=st.integers(0, 2),
    depth_fraction=st.floats(0.0, 1.0),
    fixed_depth=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_random_masked_episodes_always_terminate_with_a_valid_map(
    layers: int, experts: int, operators: int, depth_fraction: float, fixed_depth: bool, seed: int
) -> None:
    names = [f"e{i}" for i in range(experts)]
    pool = [OpSpec(op="ties", params={"density": 0.3}), OpSpec(op="dare", params={"density": 0.66})]
    pool = pool[:operators]
    min_depth = 1 + round(depth_fraction * (layers - 1))
    rewards: list[float] = []
    env = MergeMapEnv(
        layers, "base", names, lambda r: rewards.append(len(r["layers"])) or 0.5,
        operators=pool, min_depth=min_depth, fixed_depth=fixed_depth,
    )
    rng = np.random.default_rng(seed)
    obs, _ = env.reset()
    terminated = truncated = False
    while not (terminated or truncated):
        assert env.max_steps - env.t >= layers - env.cur_pos  # the invariant the back mask keeps
        valid = np.flatnonzero(env.action_masks())
        assert valid.size and (valid < env.num_sources + 2).all()
        obs, _, terminated, truncated, info = env.step(int(rng.choice(valid)))
        assert env.observation_space.contains(obs)
        assert np.array_equal(obs[: layers * env.num_sources], env.count_map.ravel())
    assert terminated and not truncated and env.t <= 2 * layers
    froms = [layer["from"] for layer in info["recipe"]["layers"]]
    assert len(froms) == env.count_map.sum() >= min_depth and rewards == [len(froms)]
    assert all(0 <= k < layers for k in froms)
    if fixed_depth:
        assert froms == list(range(layers)) and env.t == layers


def test_gymnasium_and_sb3_env_checkers_pass() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(make_env(reward_fn=lambda recipe: len(recipe["layers"]) / 8), skip_render_check=True)
        sb3_check_env(make_env(reward_fn=lambda recipe: 1.0), warn=True)
