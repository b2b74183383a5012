"""Dynamic Average Reward (ALGORITHMS.md §6.3)."""

import pytest

from search.rmm.dar import DynamicAverageReward


def test_worked_example_at_episode_692() -> None:
    dar = DynamicAverageReward(lam=0.8, t_max=700, data_scale=0.1)
    assert dar.num_chunks == 10
    for episode in range(690):
        dar.update(0.0, dar.chunk(episode))
    assert dar.update(70.0, dar.chunk(690)) == 70.0  # t = 691 starts a new pass over the data
    assert dar.update(60.0, dar.chunk(691)) == pytest.approx(67.91, abs=5e-3)  # 0.7909·70 + 0.2091·60


def test_hand_computed_sequence_with_resets_and_the_cap_past_t_max() -> None:
    dar = DynamicAverageReward(lam=0.5, t_max=4, data_scale=0.5)  # 2 chunks
    rewards = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    smoothed = [dar.update(r, dar.chunk(i)) for i, r in enumerate(rewards)]
    # t=1 reset; t=2 w=0.25; t=3 reset; t=4 w=0.5; t=5 reset; t=6 w=0.5·min(6/4, 1)=0.5.
    assert smoothed == pytest.approx([10.0, 17.5, 30.0, 35.0, 50.0, 55.0])


def test_chunk_count_rounds_and_full_data_turns_dar_off() -> None:
    assert DynamicAverageReward(data_scale=0.3).num_chunks == 3
    assert DynamicAverageReward(data_scale=0.01).num_chunks == 100
    full = DynamicAverageReward(data_scale=1.0)
    assert [full.update(r, full.chunk(i)) for i, r in enumerate([5.0, 90.0, 1.0])] == [5.0, 90.0, 1.0]


def test_state_dict_resumes_the_same_sequence() -> None:
    first = DynamicAverageReward(lam=0.9, t_max=10, data_scale=0.25)
    for i, r in enumerate([40.0, 80.0, 20.0]):
        first.update(r, first.chunk(i))
    second = DynamicAverageReward(lam=0.9, t_max=10, data_scale=0.25)
    second.load_state_dict(first.state_dict())
    assert second.update(60.0, second.chunk(3)) == first.update(60.0, first.chunk(3))


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"lam": 1.5}, "lam"), ({"t_max": 0}, "t_max"), ({"data_scale": 0.0}, "data_scale")]
)
def test_bad_settings_name_the_parameter(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DynamicAverageReward(**kwargs)


def test_chunk_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk"):
        DynamicAverageReward(data_scale=0.5).update(1.0, 2)
