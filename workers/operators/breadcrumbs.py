"""breadcrumbs: Model Breadcrumbs, task arithmetic on vectors with both tails cut (§2.5, mergekit).

Each δ_i loses its int(γ·n) largest entries (outliers) and keeps the next int(d·n) by magnitude; `elect`
adds TIES's sign election (mergekit breadcrumbs_ties). mergekit's defaults: no normalisation, no rescale.
"""

from __future__ import annotations

import torch
from pydantic import Field

from workers.operators.base import MergeContext, MergekitForm, Operator, register
from workers.operators.kernels import (
    DensitySetting,
    WeightedParams,
    breadcrumbs_masks,
    check_densities,
    combine,
    l1_rescale_each,
    per_expert,
    weighted_form,
)
from workers.recipe import Models, OpTraits


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
    traits = OpTraits(trims=True)

    def check(self, params: BreadcrumbsParams, n_experts: int, models: tuple[str, ...]) -> None:
        super().check(params, n_experts, models)
        check_densities(params, n_experts)

    def to_mergekit(self, params: BreadcrumbsParams, models: Models) -> MergekitForm | str:
        method = "breadcrumbs_ties" if params.elect else "breadcrumbs"
        return weighted_form(method, self.name, params, len(models.experts))

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: BreadcrumbsParams, ctx: MergeContext
    ) -> torch.Tensor:
        deltas = ctx.task_vectors(base, experts)
        kept = breadcrumbs_masks(deltas, per_expert(params.density, len(experts)), params.gamma, ctx)
        kept.mul_(deltas)
        if params.rescale:
            kept = l1_rescale_each(deltas, kept)
        merged = combine(kept, params.weights, elect=params.elect, normalize=params.normalize)
        return torch.add(base, merged, alpha=params.lambda_)
