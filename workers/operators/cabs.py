"""cabs: conflict-aware sequential masks with n:m balanced sparsification (CABS, ALGORITHMS.md §2.6).

Experts take their masks one after another in `order`; each keeps the n largest |τ_i| of every block of m
consecutive entries (row-major), choosing only among slots no earlier expert took. A block with fewer than n
free slots gives all free slots plus the top (n − free) occupied ones by the expert's own |τ| (paper Alg. 2).
A tail of r < m entries keeps round_half_up(r·n/m). No rescale, no normalisation, no sign election:
Δ = λ Σ_i w_i · mask_i ⊙ τ_i.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, PositiveInt

from workers.operators.base import MergeContext, Operator, register
from workers.operators.kernels import WeightedParams, check_per_expert, per_expert


class CabsParams(WeightedParams):
    n: PositiveInt | list[PositiveInt] = 64
    m: PositiveInt = 256
    order: list[int] | None = Field(None, description="Expert indices in masking order; default 0..K-1.")


def _keep_in_blocks(mag: torch.Tensor, free: torch.Tensor, keep: int) -> torch.Tensor:
    """Mask of `keep` entries per row of [blocks, width]: free slots first, each group by |τ| descending,
    equal magnitudes to the lower index (two stable sorts)."""
    by_mag = torch.sort(mag, dim=1, descending=True, stable=True).indices
    free_first = torch.sort(
        free.gather(1, by_mag).to(torch.uint8), dim=1, descending=True, stable=True
    ).indices
    chosen = by_mag.gather(1, free_first)[:, :keep]
    return torch.zeros_like(free).scatter_(1, chosen, True)


def balanced_mask(tau: torch.Tensor, occupied: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """BS(|τ|, n, m) restricted to unoccupied slots where possible (Alg. 1 with the Alg. 2 overfill rule)."""
    mag = tau.abs().reshape(-1)
    free = ~occupied.reshape(-1)
    full = mag.numel() // m * m
    mask = torch.zeros_like(free)
    if full:
        mask[:full] = _keep_in_blocks(mag[:full].view(-1, m), free[:full].view(-1, m), n).reshape(-1)
    tail = mag.numel() - full
    if tail:
        keep = math.floor(tail * n / m + 0.5)
        mask[full:] = _keep_in_blocks(mag[full:].view(1, -1), free[full:].view(1, -1), keep).reshape(-1)
    return mask.reshape(tau.shape)


@register
class Cabs(Operator):
    name = "cabs"
    Params = CabsParams

    def check(self, params: CabsParams, n_experts: int, models: tuple[str, ...]) -> None:
        super().check(params, n_experts, models)
        check_per_expert("n", params.n, n_experts)
        if any(n > params.m for n in per_expert(params.n, n_experts)):
            raise ValueError(f"n = {params.n} exceeds m = {params.m}: a block of m keeps at most m entries")
        if params.order is not None and sorted(params.order) != list(range(n_experts)):
            raise ValueError(
                f"order {params.order} is not a permutation of the expert indices 0..{n_experts - 1}"
            )

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: CabsParams, ctx: MergeContext
    ) -> torch.Tensor:
        ns = per_expert(params.n, len(experts))
        occupied = torch.zeros_like(base, dtype=torch.bool)
        merged = torch.zeros_like(base)
        taus = ctx.task_vectors(base, experts)
        for i in params.order or range(len(experts)):
            tau = taus[i]
            mask = balanced_mask(tau, occupied, int(ns[i]), params.m)
            occupied |= mask
            merged.add_(tau * mask, alpha=params.weights[i])
        return torch.add(base, merged, alpha=params.lambda_)
