"""breadcrumbs: Model Breadcrumbs, task arithmetic on vectors with both tails cut (§2.5, mergekit).

Each δ_i loses its int(γ·n) largest entries (outliers) and keeps the next int(d·n) by magnitude; `elect`
adds TIES's sign election (mergekit breadcrumbs_ties). mergekit's defaults: no normalisation, no rescale.
"""

from __future__ import annotations

import torch
from pydantic import Field

from workers.operators.base import MergeContext, Operator, register
from workers.operators.kernels import (
    DensitySetting,
    WeightedParams,
    breadcrumbs_mask,
    check_densities,
    combine,
    l1_rescale,
    per_expert,
)


class BreadcrumbsParams(WeightedParams):
    density: DensitySetting = 0.2
    gamma: float = Field(0.01, ge=0.0, lt=1.0)
    normalize: bool = False
    rescale: bool = False
    elect: bool = False


@register
class Breadcrumbs(Operator):
    name = "breadcrumbs"
    Params = BreadcrumbsParams

    def check(self, params: BreadcrumbsParams, n_experts: int, models: tuple[str, ...]) -> None:
        super().check(params, n_experts, models)
        check_densities(params, n_experts)

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: BreadcrumbsParams, ctx: MergeContext
    ) -> torch.Tensor:
        kept = []
        deltas = ctx.task_vectors(base, experts)
        for i, (delta, d) in enumerate(zip(deltas, per_expert(params.density, len(experts)))):
            cut = delta * breadcrumbs_mask(delta, d, params.gamma, ctx, i) if d < 1.0 else delta
            kept.append(l1_rescale(delta, cut) if params.rescale else cut)
        merged = combine(kept, params.weights, elect=params.elect, normalize=params.normalize)
        return torch.add(base, merged, alpha=params.lambda_)
