"""cabs: conflict-aware sequential masks with n:m balanced sparsification (CABS, ALGORITHMS.md §2.6).

Experts take their masks one after another in `order` (a list, or `by_score`: largest Σ|τ_i| on the tensor
first); each keeps the n largest |τ_i| of every block of m consecutive entries (row-major), choosing only among
slots no earlier expert took. A tail of r < m entries keeps round_half_up(r·n/m). No rescale, no normalisation,
no sign election: Δ = λ Σ_i w_i · mask_i ⊙ τ_i.

Overfill, when a block has fewer than n free slots: `alg2` (paper Alg. 2) takes all free slots plus the top
(n − free) occupied ones by the expert's own |τ|. `reference` follows the 7B script: an expert after the first
with n ≥ ⌊m/2⌋ takes every free slot plus the top ⌊m/2⌋ occupied ones, (m − n_prev) + ⌊m/2⌋ per block; below
⌊m/2⌋ it is `alg2` (for two experts sharing one n there are then at least n free slots, so nothing overfills).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt, field_validator

from workers.operators.base import MergeContext, Operator, register
from workers.operators.kernels import WeightedParams, check_per_expert, per_expert


class CabsParams(WeightedParams):
    n: PositiveInt | list[PositiveInt] = 64
    m: PositiveInt = 256
    order: list[int] | Literal["by_score"] | None = Field(
        None, description="Expert indices in masking order, or by_score; default 0..K-1."
    )
    overfill: Literal["alg2", "reference"] = "alg2"

    @field_validator("order", mode="before")
    @classmethod
    def _order_kind(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "by_score":
            raise ValueError(f"expected a list of expert indices or 'by_score', got '{v}'")
        return v


def _keep_in_blocks(mag: torch.Tensor, preferred: torch.Tensor, keep: int) -> torch.Tensor:
    """Mask of `keep` entries per row of [blocks, width]: preferred slots first, each group by |τ| descending,
    equal magnitudes to the lower index (two stable sorts)."""
    by_mag = torch.sort(mag, dim=1, descending=True, stable=True).indices
    preferred_first = torch.sort(
        preferred.gather(1, by_mag).to(torch.uint8), dim=1, descending=True, stable=True
    ).indices
    chosen = by_mag.gather(1, preferred_first)[:, :keep]
    return torch.zeros_like(preferred).scatter_(1, chosen, True)


def _blockwise(tau: torch.Tensor, preferred: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """n entries of every full block of m and round_half_up(r·n/m) of a tail of r, preferred slots first."""
    mag = tau.abs().reshape(-1)
    preferred = preferred.reshape(-1)
    full = mag.numel() // m * m
    mask = torch.zeros_like(preferred)
    if full:
        mask[:full] = _keep_in_blocks(mag[:full].view(-1, m), preferred[:full].view(-1, m), n).reshape(-1)
    tail = mag.numel() - full
    if tail:
        keep = math.floor(tail * n / m + 0.5)
        mask[full:] = _keep_in_blocks(mag[full:].view(1, -1), preferred[full:].view(1, -1), keep).reshape(-1)
    return mask.reshape(tau.shape)


def balanced_mask(tau: torch.Tensor, occupied: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """BS(|τ|, n, m) restricted to unoccupied slots where possible (Alg. 1 with the Alg. 2 overfill rule)."""
    return _blockwise(tau, ~occupied, n, m)


def reference_overfill_mask(tau: torch.Tensor, occupied: torch.Tensor, m: int) -> torch.Tensor:
    """The 7B script's second mask, (1 − occupied) ∪ BS(τ ⊙ occupied, ⌊m/2⌋, m): the occupied slots of a block
    are scored first, so the ⌊m/2⌋ extra entries are its own largest |τ| among them (−∞, not 0, elsewhere)."""
    return ~occupied | _blockwise(tau, occupied, m // 2, m)


def expert_order(order: list[int] | Literal["by_score"] | None, taus: list[torch.Tensor]) -> list[int]:
    """Masking order: as given, 0..K−1 by default, or by Σ|τ_i| on this tensor, largest first, equal totals
    by lower index (summed in float64, so that devices agree on all but near-exact ties)."""
    if order == "by_score":
        scores = [float(tau.abs().sum(dtype=torch.float64)) for tau in taus]
        return sorted(range(len(taus)), key=lambda i: (-scores[i], i))
    return list(range(len(taus))) if order is None else list(order)


def cabs_masks(
    taus: list[torch.Tensor],
    ns: list[int],
    m: int,
    order: list[int] | Literal["by_score"] | None = None,
    overfill: Literal["alg2", "reference"] = "alg2",
) -> Iterator[tuple[int, torch.Tensor]]:
    """(expert index, its mask) in masking order, each mask chosen around the slots earlier ones took."""
    occupied = torch.zeros_like(taus[0], dtype=torch.bool)
    for step, i in enumerate(expert_order(order, taus)):
        if overfill == "reference" and step > 0 and ns[i] >= m // 2:
            mask = reference_overfill_mask(taus[i], occupied, m)
        else:
            mask = balanced_mask(taus[i], occupied, ns[i], m)
        occupied |= mask
        yield i, mask


@register
class Cabs(Operator):
    name = "cabs"
    Params = CabsParams

    def check(self, params: CabsParams, n_experts: int, models: tuple[str, ...]) -> None:
        super().check(params, n_experts, models)
        check_per_expert("n", params.n, n_experts)
        if any(n > params.m for n in per_expert(params.n, n_experts)):
            raise ValueError(f"n = {params.n} exceeds m = {params.m}: a block of m keeps at most m entries")
        if isinstance(params.order, list) and sorted(params.order) != list(range(n_experts)):
            raise ValueError(
                f"order {params.order} is not a permutation of the expert indices 0..{n_experts - 1}"
            )

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: CabsParams, ctx: MergeContext
    ) -> torch.Tensor:
        ns = [int(n) for n in per_expert(params.n, len(experts))]
        taus = ctx.task_vectors(base, experts)
        merged = torch.zeros_like(base)
        for i, mask in cabs_masks(taus, ns, params.m, params.order, params.overfill):
            merged.add_(taus[i] * mask, alpha=params.weights[i])
        return torch.add(base, merged, alpha=params.lambda_)
