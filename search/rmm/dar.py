"""Dynamic Average Reward (ALGORITHMS.md §6.3): smooth subset-scored rewards across consecutive episodes.

Each episode is scored on one chunk of the dev split, so its reward is noisy. DAR blends it with the previous
smoothed reward, trusting the history more as training goes on (weight λ·t/T_max), and starts afresh when
the data iterator wraps (chunk 0), so the average never mixes two passes over the data:

    R_t = w·R_{t−1} + (1 − w)·r_t,  w = λ·min(t / T_max, 1);   R_t = r_t when the chunk index is 0.

[product] C = round(1/data_scale) chunks (the reference's float modulo never resets for e.g. 0.3), T_max
counts episodes (as the reference does), and t/T_max is capped at 1 so that a run longer than T_max keeps a
convex blend instead of giving the new reward a negative weight.
"""

from __future__ import annotations

from typing import Any


class DynamicAverageReward:
    """The smoothed terminal reward; `update` is called once per episode, in episode order."""

    def __init__(self, lam: float = 0.8, t_max: int = 700, data_scale: float = 0.1) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"dar lam must be in [0, 1], got {lam}")
        if t_max < 1:
            raise ValueError(f"dar t_max must be at least 1 episode, got {t_max}")
        if not 0.0 < data_scale <= 1.0:
            raise ValueError(f"data_scale must be in (0, 1], got {data_scale}")
        self.lam = lam
        self.t_max = t_max
        self.num_chunks = round(1.0 / data_scale)
        self.t = 0
        """Episodes smoothed so far (the last one's 1-based index)."""
        self.last: float | None = None

    def chunk(self, episode: int) -> int:
        """The data chunk that 0-based episode `episode` is scored on: consecutive chunks, wrapping."""
        return episode % self.num_chunks

    def update(self, reward: float, chunk: int) -> float:
        """Smooth the next episode's reward, scored on `chunk`; returns R_t."""
        if not 0 <= chunk < self.num_chunks:
            raise ValueError(f"chunk must be in [0, {self.num_chunks}), got {chunk}")
        self.t += 1
        if chunk == 0 or self.last is None:
            self.last = reward
        else:
            weight = self.lam * min(self.t / self.t_max, 1.0)
            self.last = weight * self.last + (1.0 - weight) * reward
        return self.last

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self.last = None if state["last"] is None else float(state["last"])
