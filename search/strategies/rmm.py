"""RMM, Reinforced Model Merging (ALGORITHMS.md §6): a PPO agent learns to build merge maps layer by layer.

Control is inverted: PPO wants to step an environment and get each reward at once, the driver wants
`ask(n)` → candidates and, later, `tell(results)`. So:

1. `ask` rolls whole episodes of `MergeMapEnv` with the current policy (masked sampling, `MergeAgent`) and
   hands out each terminal merge map as a candidate, scored on the next chunk of the data iterator
   (`subset` = DAR chunk index, consecutive and wrapping: §6.4).
2. `tell` stores each episode's fitness. Episodes then leave the waiting line strictly in episode order,
   because DAR is sequential: reward ×100 (the paper's scale), smoothed by `DynamicAverageReward`.
3. Once the smoothed episodes hold `n_steps` transitions, the agent trains on them (sb3's buffer and
   `MaskablePPO.train()`, see `search.rmm.agent`); what is left trains when the last episode comes back.
4. After training, the deterministic policy's merge map (masked argmax) and the best architecture seen
   (highest mean chunk fitness) are asked on the whole dev split (`subset = -1`, `info["final"]`).

What is sb3 and what is ours: sb3-contrib owns the policy, optimiser, returns/advantages and the PPO update;
the rollout loop, DAR, the reward cache, the budget and the final candidates are ours.

The action pool (`operators`) holds what can win on its own: a copy of the base and task arithmetic over the
experts' mean task vector at several λ (λ = 1 is the uniform average), and `warm_start` adds the best static
reference merge when it is one operator applied everywhere; a map of one action repeated is then that model.
The carrier (embeddings, final norm, head) is the first pool entry: the base by default.

Choices:
- No generation barrier: workers stay busy, so an episode may be rolled by a policy one update older than
  the one it trains; it keeps its behaviour log-probabilities, and PPO's clipped ratio corrects for that.
- Reward cache (§6.5): an episode whose (recipe hash, chunk) was already evaluated takes the cached fitness,
  and one whose pair is being evaluated right now waits for that result; neither is asked, so neither costs
  budget. Training length is therefore counted in episodes (`episodes`, also DAR's T_max; default: the
  budget less the two finals), and a run whose policy settles on one architecture may end under budget.
- Failed or non-finite results score 0 (the bottom of the [0, 1] metric scale), like an unusable model; they
  are not cached (the failure may be transient) and do not count for the best architecture seen.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import Field

from search.base import Candidate, Reference, Result, StrategyBase, StrategyParams, register
from search.rmm.agent import MergeAgent, PPOSettings, Trajectory
from search.rmm.dar import DynamicAverageReward
from search.rmm.env import MergeMapEnv
from search.space import SearchSpace
from workers.recipe import OpSpec, canonical_hash

FINALS = 2
"""Budget kept for the final candidates: the deterministic policy's map and the best architecture seen."""

SHALLOW = 8
"""Models with at most this many layers keep their depth by default: dropping or repeating one of four
layers costs far more than any merge gains (measured on the test zoo)."""

DEFAULT_POOL: tuple[OpSpec, ...] = (
    OpSpec(op="copy", params={"model": "base"}),
    *(OpSpec(op="task_arithmetic", params={"lambda": lam, "normalize": True}) for lam in (0.5, 1.0, 2.0)),
)
"""The base, and θ_base + λ·mean_i δ_i at λ = 0.5, 1 (the uniform average) and 2."""


class RMMParams(StrategyParams):
    operators: list[OpSpec] = Field(default_factory=lambda: list(DEFAULT_POOL))
    """The merge actions' pool; `weights` default to 1 per expert. A copy of 'base' means the job's base."""
    rest: OpSpec | None = None
    """Operator for tensors outside the decoder layers; None = the first merge operator (the carrier)."""
    add_best_static: bool = True
    """`warm_start` adds the best static reference merge to the pool (when it is one operator everywhere)."""
    min_depth: int | None = Field(None, ge=1, le=10_000)
    """Fewest output layers a merge map may have; None = half the source depth."""
    fixed_depth: bool | None = None
    """Mask skip and back: exactly one block per source layer (for engines with a fixed depth, and shallow
    models); None = fixed for models of at most `SHALLOW` layers."""
    episodes: int | None = Field(None, ge=1, le=1_000_000)
    """Training episodes (DAR's T_max); None = the budget less the final candidates."""
    data_scale: float = Field(0.1, gt=0, le=1)
    """Fraction of the dev split per episode: DAR cycles through round(1/data_scale) chunks."""
    dar_lambda: float = Field(0.8, ge=0, le=1)
    reward_cache: bool = True
    n_steps: int | None = Field(None, ge=1, le=100_000)
    """Transitions per PPO update; None = 4 × source depth (about 4 episodes, the reference's rate)."""
    ppo: PPOSettings = Field(default_factory=PPOSettings)


@dataclass
class Episode:
    """A rolled episode on its way from `ask` to training."""

    index: int
    chunk: int
    trajectory: Trajectory
    recipe_hash: str
    number: int | None = None
    """Its candidate number; None when the reward cache answered it."""
    fitness: float | None = None
    """Mean task metric in [0, 1] on `chunk`, once known."""
    reward: float | None = None
    """DAR-smoothed reward ×100, once every earlier episode has been smoothed."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Episode:
        return cls(**{**data, "trajectory": Trajectory(**data["trajectory"])})


@register
class RMM(StrategyBase):
    name = "rmm"
    Params = RMMParams
    params: RMMParams

    def __init__(self, space: SearchSpace, budget: int, seed: int, params: RMMParams) -> None:
        super().__init__(space, budget, seed, params)
        if budget < FINALS + 1:
            raise ValueError(f"search.budget: rmm needs at least {FINALS + 1} evaluations, got {budget}")
        if params.min_depth is not None and params.min_depth > space.num_layers:
            depth = f"{params.min_depth} exceeds the model's {space.num_layers} layers"
            raise ValueError(f"search.params.min_depth: {depth}")
        fixed = space.num_layers <= SHALLOW if params.fixed_depth is None else params.fixed_depth
        operators = [
            OpSpec(op="copy", params={"model": space.base}) if o.op == "copy" and o.params.get("model") == "base"
            else o
            for o in params.operators
        ]
        self.env = MergeMapEnv(
            space.num_layers,
            space.base,
            space.experts,
            operators=operators,
            rest=params.rest,
            min_depth=params.min_depth,
            fixed_depth=fixed,
            seed=space.seed,
        )
        self.num_episodes = params.episodes or budget - FINALS
        self.n_steps = params.n_steps or 4 * space.num_layers
        self.dar = DynamicAverageReward(params.dar_lambda, self.num_episodes, params.data_scale)
        self.agent = MergeAgent(self.env, params.ppo, seed)
        self.started = 0
        """Episodes rolled so far (asked or answered from the cache)."""
        self.waiting: list[Episode] = []
        """Rolled episodes in episode order, not yet smoothed: their fitness, or an earlier one's, is due."""
        self.batch: list[Episode] = []
        """Smoothed episodes waiting for the next PPO update."""
        self.cache: dict[str, float] = {}
        """Fitness by 'recipe hash:chunk'."""
        self.seen: dict[str, dict[str, Any]] = {}
        """Per evaluated recipe hash: its actions, fitness total and evaluation count (for the best seen)."""
        self.finals: list[dict[str, Any]] = []
        """Once training is over: role, actions, recipe, and when asked and told, number and fitness."""
        self.history: list[dict[str, float]] = []
        """Per PPO update: mean raw fitness and mean smoothed reward of its episodes, and sb3's losses."""

    def warm_start(self, references: list[Reference]) -> None:
        """Add the best static merge to the pool: the policy can then place it, and a map of it alone is it."""
        static = [
            r for r in references
            if not r.result.failed and math.isfinite(r.result.fitness) and not r.name.startswith("expert:")
        ]
        for reference in sorted(static, key=lambda r: -r.result.fitness):
            specs = reference.recipe["layers"]
            spec = OpSpec(op=specs[0]["op"], params=specs[0]["params"])
            one_op = all(set(layer) == {"from", "op", "params"} for layer in specs) and all(
                (layer["op"], layer["params"]) == (spec.op, spec.params) for layer in specs
            )
            if not self.params.add_best_static or not one_op or spec.op == "copy":
                return
            if not any(self.same_merge(spec, o) for o in self.env.operators):
                self.rebuild({**self.env.config(), "operators": [*self.env.config()["operators"], spec.model_dump()]})
            return

    def same_merge(self, a: OpSpec, b: OpSpec) -> bool:
        """Whether two operators give the same model (e.g. linear averaging and task arithmetic at λ = 1)."""
        if a == b:
            return True

        def coefficients(spec: OpSpec) -> list[float] | None:
            layer = {"op": spec.op, "params": spec.params}
            layers = [{"from": i, **layer} for i in range(self.space.num_layers)]
            return self.space.coefficients_of(self.space.assemble(layers, layer))

        ca, cb = coefficients(a), coefficients(b)
        return ca is not None and cb is not None and all(abs(x - y) < 1e-9 for x, y in zip(ca, cb))

    def rebuild(self, config: dict[str, Any]) -> None:
        """A new environment (and an untrained agent for its action space) from an environment config."""
        self.env = MergeMapEnv.from_config(config)
        self.agent = MergeAgent(self.env, self.params.ppo, self.seed)

    # ---- ask -------------------------------------------------------------------------------------------

    def ask(self, n: int) -> list[Candidate]:
        """Roll up to n episodes and ask those the cache cannot answer; roll on past n only while nothing is
        being evaluated, so that the driver always has something to wait for, yet a policy that repeats an
        architecture under evaluation does not roll its whole episode budget before learning anything."""
        candidates: list[Candidate] = []
        rolled = 0
        while len(candidates) < n and self._may_start_episode() and (rolled < n or not self._in_flight()):
            rolled += 1
            episode, recipe = self._roll()
            self.waiting.append(episode)
            if self.params.reward_cache and self._answered_without_asking(episode):
                continue
            episode.number = self._next_number()
            candidates.append(
                Candidate(
                    number=episode.number,
                    genome=[float(a) for a in episode.trajectory.actions],
                    recipe=recipe,
                    generation=self.agent.updates,
                    subset=episode.chunk,
                    info={"episode": episode.index},
                )
            )
        if len(candidates) < n and self._training_over():
            candidates += self._ask_finals(n - len(candidates))
        return candidates

    def _may_start_episode(self) -> bool:
        return self.started < self.num_episodes and self.asked < self.budget - FINALS

    def _in_flight(self) -> list[Episode]:
        """Episodes asked as candidates whose result has not come back."""
        return [e for e in self.waiting if e.number is not None and e.fitness is None]

    def _roll(self) -> tuple[Episode, dict[str, Any]]:
        trajectory, recipe = self.agent.sample_episode()
        episode = Episode(self.started, self.dar.chunk(self.started), trajectory, canonical_hash(recipe))
        self.started += 1
        return episode, recipe

    def _cache_key(self, episode: Episode) -> str:
        return f"{episode.recipe_hash}:{episode.chunk}"

    def _answered_without_asking(self, episode: Episode) -> bool:
        """Take the cached fitness of this (recipe, chunk), or wait for its evaluation already in flight."""
        key = self._cache_key(episode)
        if key in self.cache:
            episode.fitness = self.cache[key]
            self._learn_from_finished_episodes()
            return True
        return any(self._cache_key(e) == key for e in self._in_flight())

    # ---- tell ------------------------------------------------------------------------------------------

    def tell(self, results: list[Result]) -> None:
        in_flight = {e.number: e for e in self._in_flight()}
        finals = {f["number"]: f for f in self.finals if f["number"] is not None and f["fitness"] is None}
        for result in results:
            measured = not result.failed and math.isfinite(result.fitness)
            fitness = float(result.fitness) if measured else 0.0
            if result.number in finals:
                finals.pop(result.number)["fitness"] = fitness
            elif result.number in in_flight:
                episode = in_flight.pop(result.number)
                episode.fitness = fitness
                for follower in self.waiting:  # episodes that waited on this (recipe, chunk) evaluation
                    unanswered = follower.number is None and follower.fitness is None
                    if unanswered and self._cache_key(follower) == self._cache_key(episode):
                        follower.fitness = fitness
                if measured:
                    self._remember(episode, fitness)
            else:
                raise ValueError(f"rmm: candidate {result.number} is not awaited (never asked or told twice)")
            self.told += 1
        self._learn_from_finished_episodes()

    def _remember(self, episode: Episode, fitness: float) -> None:
        self.cache[self._cache_key(episode)] = fitness
        seen = self.seen.setdefault(
            episode.recipe_hash, {"actions": episode.trajectory.actions, "total": 0.0, "evaluations": 0}
        )
        seen["total"] += fitness
        seen["evaluations"] += 1

    def _learn_from_finished_episodes(self) -> None:
        """Smooth rewards in episode order (DAR is sequential) and train whenever a batch is complete."""
        while self.waiting and self.waiting[0].fitness is not None:
            episode = self.waiting.pop(0)
            episode.reward = self.dar.update(100.0 * episode.fitness, episode.chunk)
            self.batch.append(episode)
            if sum(len(e.trajectory.actions) for e in self.batch) >= self.n_steps:
                self._train()
        if self.batch and not self.waiting and not self._may_start_episode():
            self._train()  # the last, partial batch

    def _train(self) -> None:
        losses = self.agent.train([(e.trajectory, e.reward) for e in self.batch])
        self.history.append(
            {
                "fitness": sum(e.fitness for e in self.batch) / len(self.batch),
                "reward": sum(e.reward for e in self.batch) / len(self.batch),
                **losses,
            }
        )
        self.batch = []

    # ---- end of training ------------------------------------------------------------------------------

    def _training_over(self) -> bool:
        return not self._may_start_episode() and not self.waiting and not self.batch

    def best_seen(self) -> dict[str, Any] | None:
        """The evaluated architecture with the highest mean chunk fitness: hash, actions, fitness, count."""
        if not self.seen:
            return None
        key, seen = max(self.seen.items(), key=lambda item: item[1]["total"] / item[1]["evaluations"])
        mean = seen["total"] / seen["evaluations"]
        return {"hash": key, "actions": seen["actions"], "fitness": mean, "evaluations": seen["evaluations"]}

    def _ask_finals(self, n: int) -> list[Candidate]:
        if not self.finals:
            self.finals = self._make_finals()
        candidates = []
        for final in self.finals:
            if final["number"] is None and len(candidates) < n:
                final["number"] = self._next_number()
                candidates.append(
                    Candidate(
                        number=final["number"],
                        genome=[float(a) for a in final["actions"]],
                        recipe=final["recipe"],
                        generation=self.agent.updates,
                        subset=-1,
                        info={"final": True, "role": final["role"]},
                    )
                )
        return candidates

    def _make_finals(self) -> list[dict[str, Any]]:
        """The deterministic policy's map and, if different, the best architecture seen."""
        actions, recipe = self.agent.greedy_episode()
        finals = [{"role": "policy", "actions": actions, "recipe": recipe}]
        best = self.best_seen()
        if best is not None and best["hash"] != canonical_hash(recipe):
            best_recipe = self._recipe_of(best["actions"])
            finals.append({"role": "best_seen", "actions": best["actions"], "recipe": best_recipe})
        return [{**final, "number": None, "fitness": None} for final in finals]

    def _recipe_of(self, actions: list[int]) -> dict[str, Any]:
        self.env.reset()
        for action in actions:
            _, _, _, _, info = self.env.step(action)
        return info["recipe"]

    def done(self) -> bool:
        return bool(self.finals) and all(f["fitness"] is not None for f in self.finals)

    # ---- checkpoint ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "env": self.env.config(),
            "net_arch": self.params.ppo.net_arch,
            "agent": self.agent.state_dict(),
            "dar": self.dar.state_dict(),
            "started": self.started,
            "waiting": [asdict(e) for e in self.waiting],
            "batch": [asdict(e) for e in self.batch],
            "cache": self.cache,
            "seen": self.seen,
            "finals": self.finals,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state["env"] != self.env.config():  # the pool grew in `warm_start`
            self.rebuild(state["env"])
        self.agent.load_state_dict(state["agent"])
        self.dar.load_state_dict(state["dar"])
        self.started = int(state["started"])
        self.waiting = [Episode.from_json(e) for e in state["waiting"]]
        self.batch = [Episode.from_json(e) for e in state["batch"]]
        self.cache = dict(state["cache"])
        self.seen = {k: dict(v) for k, v in state["seen"].items()}
        self.finals = [dict(f) for f in state["finals"]]
        self.history = list(state["history"])
