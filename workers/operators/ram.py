"""ram: Reinforced Agent Merging (§2.8): average where task vectors overlap, keep unique entries whole.

Per tensor, an entry is active for expert k by the ε rule (`|δ_k| > ε`, mergekit `ram`) or, in the 70B
paper's variant, when `|δ_k| ≥ τ_k` (τ_k the linear-interpolated `percentile` of |δ_k|) and `|δ_k| > 0`.
Shared entries (active in ≥ 2 experts) take Σ_k a_k δ_k divided by the active count (mergekit) or by K
(paper70b); unique entries take δ_k, scaled by λ = 1.5 in paper70b; inactive entries stay at the base.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from workers.operators.base import MergeContext, MergekitForm, Operator, OpParams, register
from workers.operators.kernels import kth_smallest
from workers.recipe import Models


class RamParams(OpParams):
    variant: Literal["mergekit", "paper70b"] = "mergekit"
    epsilon: float = Field(1e-5, ge=0.0)
    percentile: float | None = Field(
        90.0, ge=0.0, le=100.0, description="paper70b activity threshold; null uses the ε rule instead."
    )
    lambda_: float = Field(1.5, alias="lambda", description="paper70b scale of unique entries.")
    shared_divisor: Literal["K", "count"] | None = Field(
        None, description="Default: count (mergekit), K (paper70b)."
    )


def percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated percentile (numpy's default) via two k-th values (no size limit)."""
    flat = x.reshape(-1)
    pos = (flat.numel() - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, flat.numel() - 1)
    v_lo = kth_smallest(flat, lo + 1)
    v_hi = kth_smallest(flat, hi + 1)
    return v_lo + (v_hi - v_lo) * (pos - lo)


def epsilon_active(deltas: torch.Tensor, epsilon: float) -> torch.Tensor:
    """[K, ...] activity of [K, ...] task vectors by mergekit's rule |δ_k| > ε."""
    return torch.stack([d.abs() > epsilon for d in deltas])


def ram_combine(
    deltas: torch.Tensor,
    active: torch.Tensor,
    unique_scales: list[float],
    divisor: Literal["K", "count"],
) -> torch.Tensor:
    """Shared entries: Σ_k a_k δ_k / (count or K); unique entries: scale_k · δ_k; the rest 0."""
    count = active.sum(0)
    shared = count >= 2
    total = torch.zeros_like(deltas[0])
    unique = torch.zeros_like(deltas[0])
    for k, d in enumerate(deltas):
        kept = torch.where(active[k], d, 0.0)
        total.add_(kept)
        unique.add_(torch.where(count == 1, kept, 0.0), alpha=unique_scales[k])
    denominator = count.clamp_min(1).to(total.dtype) if divisor == "count" else float(len(deltas))
    return torch.where(shared, total / denominator, unique)


@register
class Ram(Operator):
    name = "ram"
    Params = RamParams

    def to_mergekit(self, params: RamParams, models: Models) -> MergekitForm | str:
        if params.variant != "mergekit" or params.shared_divisor not in (None, "count"):
            return "ram: mergekit's ram is variant 'mergekit' with shared_divisor 'count' only"
        return MergekitForm("ram", {"epsilon": params.epsilon}, [{}] * len(models.experts))

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: RamParams, ctx: MergeContext
    ) -> torch.Tensor:
        deltas = ctx.task_vectors(base, experts)
        if params.variant == "mergekit":
            active, scale, divisor = epsilon_active(deltas, params.epsilon), 1.0, "count"
        else:
            if params.percentile is None:
                active = epsilon_active(deltas, params.epsilon)
            else:
                active = torch.stack(
                    [(d.abs() >= percentile(d.abs(), params.percentile)) & (d != 0) for d in deltas]
                )
            scale, divisor = params.lambda_, "K"
        return base + ram_combine(deltas, active, [scale] * len(deltas), params.shared_divisor or divisor)
