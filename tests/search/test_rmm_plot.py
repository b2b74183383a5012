"""Merge-map heatmaps and the deterministic policy's map read out of a strategy state."""

import json
from pathlib import Path

import pytest
import torch

from search.base import Result, make_strategy
from search.rmm.plot import plot_merge_map, policy_merge_map
from tests.search.synthetic import make_space


def test_policy_merge_map_matches_the_final_candidate_built_from_the_same_state() -> None:
    torch.set_num_threads(1)
    pool = [{"op": "ties", "params": {"density": 0.3}}, {"op": "dare", "params": {"density": 0.66}}]
    strategy = make_strategy("rmm", make_space(layers=3, experts=2), 12, 0, {"operators": pool})
    while not (candidates := strategy.ask(4))[-1].info.get("final"):
        strategy.tell([Result(c.number, 0.1 * (c.number % 7)) for c in candidates])
    state = json.loads(json.dumps(strategy.state_dict()))

    merge_map = policy_merge_map(state)

    assert merge_map.layer_labels == ["layer 0", "layer 1", "layer 2"]
    assert merge_map.action_labels == ["e0", "e1", "ties", "dare"]
    final = next(c for c in candidates if c.info.get("role") == "policy")
    expected = [[0.0] * 4 for _ in range(3)]
    for layer in final.recipe["layers"]:
        source = layer["params"]["model"] if layer["op"] == "copy" else layer["op"]
        expected[layer["from"]][merge_map.action_labels.index(source)] += 1
    assert merge_map.count_map == expected


def test_plot_writes_a_png(tmp_path: Path) -> None:
    count_map = [[1, 0, 2], [0, 1, 0]]
    path = plot_merge_map(count_map, ["layer 0", "layer 1"], ["a", "b", "ties"], tmp_path / "map.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


@pytest.mark.parametrize(
    ("layers", "actions", "name"),
    [(["only one"], ["a", "b"], "layer_labels"), (["x", "y"], ["a"], "action_labels")],
)
def test_plot_refuses_labels_that_do_not_fit(
    tmp_path: Path, layers: list[str], actions: list[str], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        plot_merge_map([[1, 0], [0, 1]], layers, actions, tmp_path / "map.png")
