"""ties: TIES-Merging (trim, elect sign, disjoint merge), ALGORITHMS.md §2.4.

The election runs on the weighted vectors w_i·τ̂_i with mergekit's `Σ ≥ 0 → +1` rule; `normalize=False`
gives the disjoint weighted sum (mergekit's dare_ties default, CABS's TIES recipe), `rescale=True` adds
mergekit's L1 rescale after trimming.
"""

from __future__ import annotations

import torch

from workers.operators.base import MergeContext, Operator, register
from workers.operators.kernels import (
    DensitySetting,
    WeightedParams,
    check_densities,
    combine,
    l1_rescale_each,
    per_expert,
    trim_task_vectors,
)


class TiesParams(WeightedParams):
    density: DensitySetting = 0.2
    normalize: bool = True
    rescale: bool = False


@register
class Ties(Operator):
    name = "ties"
    Params = TiesParams

    def check(self, params: TiesParams, n_experts: int, models: tuple[str, ...]) -> None:
        super().check(params, n_experts, models)
        check_densities(params, n_experts)

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: TiesParams, ctx: MergeContext
    ) -> torch.Tensor:
        deltas = ctx.task_vectors(base, experts)
        trimmed = trim_task_vectors(deltas, per_expert(params.density, len(experts)), ctx)
        if params.rescale:
            trimmed = l1_rescale_each(deltas, trimmed)
        del deltas  # a one-off merge frees the untrimmed vectors before combining (its peak memory)
        return torch.add(
            base,
            combine(trimmed, params.weights, elect=True, normalize=params.normalize),
            alpha=params.lambda_,
        )
