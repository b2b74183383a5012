"""Merge maps as pictures: for each source layer, how many output layers each expert or operator supplied.

`policy_merge_map` reads what the trained agent would build now (its masked argmax rollout) out of an RMM
strategy state, without evaluating anything; `plot_merge_map` draws any count map as a layer × source heatmap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from search.rmm.agent import MergeAgent, PPOSettings
from search.rmm.env import MergeMapEnv


class MergeMap(NamedTuple):
    count_map: list[list[float]]
    """[layer][source]: output layers placed from that source at that source layer."""
    layer_labels: list[str]
    action_labels: list[str]
    """The sources: experts, then merge operators (skip and back place nothing, so they have no column)."""


def policy_merge_map(state: dict[str, Any]) -> MergeMap:
    """The deterministic policy's merge map, rebuilt from an RMM strategy's `state_dict()`."""
    env = MergeMapEnv.from_config(state["env"])
    agent = MergeAgent(env, PPOSettings(net_arch=state["net_arch"]), seed=0)
    agent.load_state_dict(state["agent"])
    agent.greedy_episode()
    return MergeMap(env.count_map.tolist(), env.layer_labels, env.action_labels[: env.num_sources])


def plot_merge_map(
    count_map: list[list[float]], layer_labels: list[str], action_labels: list[str], path: Path
) -> Path:
    """Write the count map as a heatmap PNG (layers down, sources across, counts written in); returns path."""
    if len(count_map) != len(layer_labels):
        raise ValueError(f"layer_labels has {len(layer_labels)} names for {len(count_map)} layers")
    if any(len(row) != len(action_labels) for row in count_map):
        raise ValueError(f"action_labels has {len(action_labels)} names, count_map rows differ in length")
    figure = Figure(figsize=(1.5 + 0.8 * len(action_labels), 1.2 + 0.4 * len(layer_labels)))
    axes = figure.subplots()
    most = max(1.0, max(map(max, count_map)))
    image = axes.imshow(count_map, cmap="Blues", vmin=0, vmax=most, aspect="auto")
    axes.set_xticks(range(len(action_labels)), labels=action_labels, rotation=30, ha="right")
    axes.set_yticks(range(len(layer_labels)), labels=layer_labels)
    axes.set_xlabel("source")
    axes.set_ylabel("source layer")
    for layer, row in enumerate(count_map):
        for source, count in enumerate(row):
            if count:
                axes.text(source, layer, f"{count:g}", ha="center", va="center", color="darkorange")
    figure.colorbar(image, ax=axes, label="output layers placed", ticks=MaxNLocator(integer=True))
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path
