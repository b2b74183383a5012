"""The RMM merge-map environment (ALGORITHMS.md §6.5): walk the source layers and build a merged model.

At each step the agent, standing at source layer `cur_pos`, places one output layer taken from an expert
(model action) or from a merge operator over all experts (merge action), skips the source layer, or goes back
one layer (later picks append, so a layer may repeat). When `cur_pos` reaches L the merge map becomes a
recipe, and the terminal reward is `reward_fn(recipe)`.

Why the observation adds `cur_pos` and `t` to the reference's count map: skip and back leave the count map
unchanged, so the reference's state is not Markov (§6.1). Why action masks instead of the reference's −10
penalty: with them every episode reaches L within `max_steps = 2L` and holds at least `min_depth` layers, so
no evaluation is spent on an architecture that cannot be built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from workers.recipe import OpSpec, Recipe

RewardFn = Callable[[dict[str, Any]], float]

DEFAULT_OPERATORS: tuple[OpSpec, ...] = (
    OpSpec(op="ties", params={"density": 0.3, "lambda": 1.0}),
    OpSpec(op="dare", params={"density": 0.66}),
)
"""The reference's merge pool (TIES at density 0.3, DARE at 0.66), weight 1 per expert (filled in)."""


class MergeMapEnv(gym.Env[np.ndarray, int]):
    """Actions: `0..N-1` copy expert i's layer; `N..N+M-1` merge operator j; `N+M` skip; `N+M+1` back.

    Observation (float32, length L·(N+M) + L + 2): the count map [L, N+M] flattened layer-major (how often
    each source was placed at each layer), one-hot `cur_pos` over 0..L, and `t / max_steps`.

    `reward_fn=None` defers the reward: the terminal step returns 0.0 and the caller scores `info["recipe"]`
    later (the RMM strategy does, through its workers). The recipe's `rest` (embeddings, final norm, head) is
    the carrier: the first merge operator by default, as the reference's carrier is its first merged model,
    or the first expert when there are no operators. An action that the mask forbids spends a step and
    changes nothing, so the environment stays defined for unmasked agents; such an agent may run out of steps,
    which truncates the episode with reward 0.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(
        self,
        num_layers: int,
        base: str,
        experts: Sequence[str],
        reward_fn: RewardFn | None = None,
        operators: Sequence[OpSpec] = DEFAULT_OPERATORS,
        rest: OpSpec | None = None,
        min_depth: int | None = None,
        fixed_depth: bool = False,
        seed: int = 0,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if not experts:
            raise ValueError("experts: at least one expert is needed")
        self.num_layers = num_layers
        self.base = base
        self.experts = list(experts)
        self.reward_fn = reward_fn
        self.operators = [o.weighted(len(self.experts)) for o in operators]
        self.rest = rest or (self.operators[0] if self.operators else self._copy(self.experts[0]))
        self.min_depth = max(1, num_layers // 2) if min_depth is None else min_depth
        if not 1 <= self.min_depth <= num_layers:
            raise ValueError(f"min_depth must be in [1, num_layers={num_layers}], got {self.min_depth}")
        self.fixed_depth = fixed_depth
        self.recipe_seed = seed

        self.num_sources = len(self.experts) + len(self.operators)
        self.skip_action = self.num_sources
        self.back_action = self.num_sources + 1
        self.max_steps = 2 * num_layers
        self.action_space = spaces.Discrete(self.num_sources + 2)
        obs_size = num_layers * self.num_sources + num_layers + 2
        self.observation_space = spaces.Box(0.0, float(self.max_steps), (obs_size,), np.float32)
        self._start()

    def _start(self) -> None:
        self.count_map = np.zeros((self.num_layers, self.num_sources), np.float32)
        self.blocks: list[tuple[int, int]] = []
        """The placed layers in output order, as (source layer, source action)."""
        self.cur_pos = 0
        self.t = 0

    @property
    def action_labels(self) -> list[str]:
        """Names of the N+M+2 actions, e.g. ['math', 'code', 'base', 'ties', 'skip', 'back']: a copy is named by
        its model, operators that repeat by their λ (or their index)."""
        ops = [o.params["model"] if o.op == "copy" else o.op for o in self.operators]
        lambdas = [o.params.get("lambda") for o in self.operators]

        def label(j: int, op: str) -> str:
            if ops.count(op) == 1:
                return op
            same = [lam for o, lam in zip(ops, lambdas) if o == op]
            return f"{op} λ={lambdas[j]}" if None not in same and len(set(same)) == len(same) else f"{op}#{j}"

        unique = [label(j, op) for j, op in enumerate(ops)]
        return [*self.experts, *unique, "skip", "back"]

    @property
    def layer_labels(self) -> list[str]:
        return [f"layer {k}" for k in range(self.num_layers)]

    def config(self) -> dict[str, Any]:
        """The JSON that `from_config` rebuilds this environment from (kept in the strategy's state)."""
        return {
            "num_layers": self.num_layers,
            "base": self.base,
            "experts": self.experts,
            "operators": [o.model_dump() for o in self.operators],
            "rest": self.rest.model_dump(),
            "min_depth": self.min_depth,
            "fixed_depth": self.fixed_depth,
            "seed": self.recipe_seed,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], reward_fn: RewardFn | None = None) -> MergeMapEnv:
        return cls(
            config["num_layers"],
            config["base"],
            config["experts"],
            reward_fn,
            operators=[OpSpec.model_validate(o) for o in config["operators"]],
            rest=OpSpec.model_validate(config["rest"]),
            min_depth=config["min_depth"],
            fixed_depth=config["fixed_depth"],
            seed=config["seed"],
        )

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._start()
        return self._observation(), {}

    def action_masks(self) -> np.ndarray:
        """Valid actions now (§6.5); read by MaskablePPO. All False once the episode is over."""
        mask = np.zeros(self.action_space.n, dtype=bool)
        if self.cur_pos >= self.num_layers or self.t >= self.max_steps:
            return mask
        mask[: self.num_sources] = True
        if not self.fixed_depth:
            steps_left = self.max_steps - self.t
            layers_left = self.num_layers - self.cur_pos
            # Skipping must leave enough layers ahead to still reach min_depth.
            mask[self.skip_action] = len(self.blocks) + layers_left - 1 >= self.min_depth
            # Going back must leave enough steps to walk forward to L again.
            mask[self.back_action] = self.cur_pos > 0 and steps_left >= layers_left + 2
        return mask

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self.cur_pos >= self.num_layers or self.t >= self.max_steps:
            raise RuntimeError("step() after the episode ended: call reset() first")
        action = int(action)
        if self.action_masks()[action]:
            if action == self.skip_action:
                self.cur_pos += 1
            elif action == self.back_action:
                self.cur_pos -= 1
            else:
                self.count_map[self.cur_pos, action] += 1
                self.blocks.append((self.cur_pos, action))
                self.cur_pos += 1
        self.t += 1
        terminated = self.cur_pos == self.num_layers
        truncated = not terminated and self.t >= self.max_steps
        reward, info = 0.0, {}
        if terminated:
            info["recipe"] = self.recipe()
            reward = float(self.reward_fn(info["recipe"])) if self.reward_fn is not None else 0.0
        return self._observation(), reward, terminated, truncated, info

    def recipe(self) -> dict[str, Any]:
        """The merge map placed so far as recipe JSON: one output layer per placed block, in order."""
        layers = []
        for source_layer, action in self.blocks:
            if action < len(self.experts):
                spec = self._copy(self.experts[action])
            else:
                spec = self.operators[action - len(self.experts)]
            layers.append({"from": source_layer, "op": spec.op, "params": spec.params})
        recipe = Recipe.model_validate(
            {
                "models": {"base": self.base, "experts": self.experts},
                "layers": layers,
                "rest": self.rest.model_dump(),
                "seed": self.recipe_seed,
            }
        )
        return recipe.to_json()

    def _observation(self) -> np.ndarray:
        position = np.zeros(self.num_layers + 1, np.float32)
        position[self.cur_pos] = 1.0
        progress = np.array([self.t / self.max_steps], np.float32)
        return np.concatenate([self.count_map.ravel(), position, progress])

    @staticmethod
    def _copy(expert: str) -> OpSpec:
        return OpSpec(op="copy", params={"model": expert})
