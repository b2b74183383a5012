"""lore: LoRE-Merging, a low-rank estimate of the task vectors around an estimated base (§2.7).

Coordinate descent from δ_i = 0: θ0 = mean_i(θ_i − δ_i), δ_i = SVT(θ_i − θ0; μ), until the relative change
of θ0 is below `tol` or after `max_iter` rounds; then θ* = θ0 + λ·post({δ_i}). The base model is not used.
In `rank` mode μ = σ_{r+1}(θ_i − θ0) per matrix and round, r = int(rank·min(rows, cols)), so at most r
singular values survive; `mu` mode uses a fixed threshold. 1-D tensors and names in `skip` are averaged.
With two experts every post-merge except `ties` returns the plain average (§2.7, K = 2 degeneracy).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import Field, PositiveInt, model_validator

from workers.operators.base import MergeContext, Operator, OpParams, register
from workers.operators.kernels import combine


class LoreParams(OpParams):
    mode: Literal["rank", "mu"] = "rank"
    rank: float = Field(0.2, gt=0.0, le=1.0, description="Kept rank as a fraction of min(rows, cols).")
    mu: float | None = Field(None, ge=0.0, description="Fixed SVT threshold (mode 'mu').")
    post: Literal["direct", "average", "ties"] = "direct"
    lambda_: float = Field(1.0, alias="lambda")
    max_iter: PositiveInt = 20
    tol: float = Field(1e-4, gt=0.0)
    skip: list[str] = Field(default_factory=lambda: ["embed_tokens", "lm_head"])

    @model_validator(mode="after")
    def _mu_given(self) -> LoreParams:
        if self.mode == "mu" and self.mu is None:
            raise ValueError("mode 'mu' needs a value for mu")
        return self


def svt(x: torch.Tensor, mu: float | None, rank_fraction: float) -> torch.Tensor:
    """Singular value thresholding of a batch of matrices [..., rows, cols]: U·diag(max(σ − μ, 0))·Vᵀ."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if mu is None:
        r = int(rank_fraction * min(x.shape[-2:]))
        threshold = s[..., r : r + 1] if r < s.shape[-1] else torch.zeros_like(s[..., :1])
    else:
        threshold = torch.full_like(s[..., :1], mu)
    return (u * (s - threshold).clamp_min(0.0).unsqueeze(-2)) @ vh


def lore_estimate(
    thetas: list[torch.Tensor], mu: float | None, rank_fraction: float, max_iter: int, tol: float
) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Alg. 1 on matrices [..., rows, cols]: returns (θ0, [δ_i], rounds run)."""
    deltas = [torch.zeros_like(t) for t in thetas]
    theta0 = torch.stack(thetas).mean(0)
    for rounds in range(1, max_iter + 1):
        new = torch.stack([t - d for t, d in zip(thetas, deltas)]).mean(0)
        deltas = [svt(t - new, mu, rank_fraction) for t in thetas]
        change = torch.linalg.vector_norm(new - theta0) / torch.linalg.vector_norm(new).clamp_min(1e-12)
        theta0 = new
        if rounds > 1 and change < tol:
            break
    return theta0, deltas, rounds


def as_matrices(x: torch.Tensor) -> torch.Tensor:
    """2-D stays, 3-D is a batch of matrices (MoE experts), higher ranks flatten to (shape[0], −1)."""
    return x if x.dim() in (2, 3) else x.reshape(x.shape[0], -1)


@register
class Lore(Operator):
    name = "lore"
    Params = LoreParams

    def check(self, params: LoreParams, n_experts: int, models: tuple[str, ...]) -> None:
        if n_experts == 2 and params.post != "ties":
            warnings.warn(
                "lore with two experts returns the plain average unless post is 'ties' (ALGORITHMS.md §2.7)"
            )

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: LoreParams, ctx: MergeContext
    ) -> torch.Tensor:
        if base.dim() < 2 or any(s in ctx.tensor for s in params.skip):
            return torch.stack(experts).mean(0)
        mu = params.mu if params.mode == "mu" else None
        theta0, deltas, _ = lore_estimate(
            [as_matrices(x) for x in experts], mu, params.rank, params.max_iter, params.tol
        )
        if params.post == "ties":
            tau = combine(deltas, [1.0] * len(deltas), elect=True, normalize=True)
        else:
            tau = torch.stack(deltas).sum(0)
            if params.post == "average":
                tau /= len(deltas)
        return (theta0 + params.lambda_ * tau).reshape(base.shape)
