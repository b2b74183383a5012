"""The RMM policy: sb3-contrib MaskablePPO's networks, optimiser and update, driven one episode at a time.

sb3's `learn()` steps the environment and wants each reward at once, but RMM's rewards come back later from
the workers. So sb3 keeps what it is good at — the actor-critic policy (separate 64-64 tanh actor and critic,
§6.5), Adam, `MaskableRolloutBuffer` (returns and advantages; gae_lambda = 1 makes them Monte-Carlo,
A = R − V(s)) and `MaskablePPO.train()` (the clipped update, n_epochs full-batch passes) — and this module
rolls episodes out itself and fills a fresh buffer with whole episodes when the strategy asks it to train.
Torch stays in here: the strategy sees lists of ints and floats.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.buffers import MaskableRolloutBuffer
from stable_baselines3.common.logger import Logger

from search.base import seeded_generators
from search.rmm.env import MergeMapEnv


class PPOSettings(BaseModel):
    """MaskablePPO's settings, defaulting to the reference's (§6.2, §6.5)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = Field(3e-4, gt=0)
    n_epochs: int = Field(40, ge=1, le=1000)
    gamma: float = Field(0.99, gt=0, le=1)
    gae_lambda: float = Field(1.0, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    ent_coef: float = Field(1e-4, ge=0)
    vf_coef: float = Field(0.5, ge=0)
    max_grad_norm: float = Field(0.5, gt=0)
    net_arch: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [64, 64], min_length=1, max_length=8)
    """Hidden layer sizes, the same for the actor and the critic."""


@dataclass
class Trajectory:
    """One episode's actions, with the behaviour policy's value estimates and log-probabilities.

    Observations and masks are not kept: the environment is deterministic, so `train` replays them from the
    actions, and a checkpoint holding pending episodes stays small.
    """

    actions: list[int]
    values: list[float]
    log_probs: list[float]


class MergeAgent:
    """A MaskablePPO policy acting in a `MergeMapEnv` (with a deferred reward) outside of `learn()`."""

    def __init__(self, env: MergeMapEnv, settings: PPOSettings, seed: int) -> None:
        self.env = env
        init_seed, sampling_seed, self.shuffle_seed = (
            int(g.integers(2**31)) for g in seeded_generators(seed, 3)
        )
        with torch.random.fork_rng(devices=[]):  # seeds the weight init without touching the global stream
            torch.manual_seed(init_seed)
            self.model = MaskablePPO(
                "MlpPolicy",
                env,
                learning_rate=settings.learning_rate,
                n_steps=1,  # sb3's own buffer goes unused: `train` builds one per batch of whole episodes
                batch_size=None,  # full batch, as the reference
                n_epochs=settings.n_epochs,
                gamma=settings.gamma,
                gae_lambda=settings.gae_lambda,
                clip_range=settings.clip_range,
                ent_coef=settings.ent_coef,
                vf_coef=settings.vf_coef,
                max_grad_norm=settings.max_grad_norm,
                policy_kwargs={
                    "net_arch": {"pi": settings.net_arch, "vf": settings.net_arch},
                    "activation_fn": torch.nn.Tanh,
                },
                device="cpu",
            )
        self.model.set_logger(Logger(folder=None, output_formats=[]))  # `train()` records its losses here
        self.policy = self.model.policy
        self.sampler = torch.Generator().manual_seed(sampling_seed)
        self.updates = 0

    def sample_episode(self) -> tuple[Trajectory, dict[str, Any]]:
        """Roll one episode with masked sampling from the current policy; returns it and its recipe."""
        obs, _ = self.env.reset()
        trajectory = Trajectory([], [], [])
        terminated = False
        while not terminated:
            obs_tensor = torch.as_tensor(obs).unsqueeze(0)
            with torch.no_grad():
                distribution = self.policy.get_distribution(obs_tensor, action_masks=self.env.action_masks())
                action = torch.multinomial(distribution.distribution.probs, 1, generator=self.sampler)[:, 0]
                log_prob = distribution.log_prob(action)
                value = self.policy.predict_values(obs_tensor)
            trajectory.actions.append(int(action))
            trajectory.values.append(float(value))
            trajectory.log_probs.append(float(log_prob))
            obs, _, terminated, _, info = self.env.step(int(action))
        return trajectory, info["recipe"]

    def greedy_episode(self) -> tuple[list[int], dict[str, Any]]:
        """Roll the deterministic policy (masked argmax); the env's `count_map` then holds its merge map."""
        obs, _ = self.env.reset()
        actions: list[int] = []
        terminated = False
        while not terminated:
            action, _ = self.policy.predict(obs, deterministic=True, action_masks=self.env.action_masks())
            actions.append(int(action))
            obs, _, terminated, _, info = self.env.step(int(action))
        return actions, info["recipe"]

    def train(self, batch: Sequence[tuple[Trajectory, float]]) -> dict[str, float]:
        """One PPO update on whole episodes, each with its terminal reward; returns sb3's training losses."""
        size = sum(len(trajectory.actions) for trajectory, _ in batch)
        buffer = MaskableRolloutBuffer(
            size,
            self.env.observation_space,
            self.env.action_space,
            device="cpu",
            gae_lambda=self.model.gae_lambda,
            gamma=self.model.gamma,
        )
        for trajectory, reward in batch:
            observations, masks = self._replay(trajectory.actions)
            last = len(trajectory.actions) - 1
            for i, action in enumerate(trajectory.actions):
                buffer.add(
                    observations[i][None],
                    np.array([action]),
                    np.array([reward if i == last else 0.0], np.float32),
                    np.array([i == 0], np.float32),
                    torch.tensor([trajectory.values[i]]),
                    torch.tensor([trajectory.log_probs[i]]),
                    action_masks=masks[i],
                )
        # Every episode in the buffer is complete, so there is nothing to bootstrap from.
        buffer.compute_returns_and_advantage(last_values=torch.zeros(1), dones=np.ones(1))
        self.model.rollout_buffer = buffer
        # sb3's buffer shuffles with NumPy's global generator: seed it per update so that training is
        # reproducible (and a resumed run identical), then give the caller its state back.
        numpy_state = np.random.get_state()
        np.random.seed((self.shuffle_seed + self.updates) % 2**32)
        try:
            self.model.train()
        finally:
            np.random.set_state(numpy_state)
        self.updates += 1
        logged = self.model.logger.name_to_value
        return {key.removeprefix("train/"): float(logged[key]) for key in logged if key.startswith("train/")}

    def _replay(self, actions: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The observations and masks the policy saw while taking `actions`."""
        obs, _ = self.env.reset()
        observations, masks = [], []
        for action in actions:
            observations.append(obs)
            masks.append(self.env.action_masks())
            obs, *_ = self.env.step(action)
        return np.array(observations), np.array(masks)

    def state_dict(self) -> dict[str, Any]:
        """Policy weights, Adam state and the sampler's RNG state (torch.save bytes, base64), JSON-safe."""
        blob = io.BytesIO()
        torch.save(
            {
                "policy": self.policy.state_dict(),
                "optimizer": self.policy.optimizer.state_dict(),
                "sampler": self.sampler.get_state(),
            },
            blob,
        )
        return {"torch": base64.b64encode(blob.getvalue()).decode("ascii"), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = torch.load(io.BytesIO(base64.b64decode(state["torch"])), weights_only=True)
        self.policy.load_state_dict(saved["policy"])
        self.policy.optimizer.load_state_dict(saved["optimizer"])
        self.sampler.set_state(saved["sampler"])
        self.updates = int(state["updates"])
