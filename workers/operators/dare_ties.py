"""dare_ties: DARE sparsification, then TIES's sign election and disjoint merge (§2.5).

Defaults follow the papers (1/(1 − p) rescale, disjoint mean); mergekit's dare_ties is `rescale: l1,
normalize: false` (a disjoint weighted sum), which `recipe_from_mergekit` sets.
"""

from __future__ import annotations

import torch

from workers.operators.base import MergeContext, Operator, register
from workers.operators.dare import DareParams, dare_deltas
from workers.operators.kernels import check_densities, combine


class DareTiesParams(DareParams):
    normalize: bool = True


@register
class DareTies(Operator):
    name = "dare_ties"
    Params = DareTiesParams

    def check(self, params: DareTiesParams, n_experts: int, models: tuple[str, ...]) -> None:
        super().check(params, n_experts, models)
        check_densities(params, n_experts)

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: DareTiesParams, ctx: MergeContext
    ) -> torch.Tensor:
        deltas = dare_deltas(base, experts, params, ctx)
        return torch.add(
            base,
            combine(deltas, params.weights, elect=True, normalize=params.normalize),
            alpha=params.lambda_,
        )
