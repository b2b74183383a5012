"""dare: drop each task-vector entry with probability p = 1 − density, rescale, add (§2.5; dare_linear).

Masks come from the recipe's per-(tensor, model) generator, so a recipe always gives the same weights. The
default rescale is the paper's 1/(1 − p); `rescale: l1` and `normalize` reproduce mergekit's dare_linear.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from workers.operators.base import MergeContext, MergekitForm, MergekitRead, Operator, register
from workers.operators.kernels import (
    DareRescale,
    DensitySetting,
    WeightedParams,
    check_densities,
    combine,
    dare_task_vector,
    per_expert,
    weighted_form,
    weighted_method,
    weighted_params,
)
from workers.recipe import Models, OpTraits


class DareParams(WeightedParams):
    density: DensitySetting = 0.5
    rescale: DareRescale = "inverse_p"
    normalize: bool = False


@register
class Dare(Operator):
    name = "dare"
    Params = DareParams
    traits = OpTraits(trims=True)
    random_masks = True
    mergekit_import = weighted_method("dare_linear", normalize=False, rescale=True)
    elect: ClassVar[bool] = False
    """Whether the DARE-sparsified task vectors go through TIES's sign election (dare_ties subclasses this)."""

    def check(self, params: DareParams, n_experts: int, models: tuple[str, ...]) -> None:
        super().check(params, n_experts, models)
        check_densities(params, n_experts)

    def from_mergekit(self, read: MergekitRead) -> dict[str, Any]:
        """mergekit's `rescale` is the L1 match or none (never the paper's 1/(1 − p))."""
        return {**weighted_params(read), "rescale": "l1" if read.shared["rescale"] else "none"}

    def to_mergekit(self, params: DareParams, models: Models) -> MergekitForm | str:
        method = "dare_ties" if self.elect else "dare_linear"
        return weighted_form(method, self.name, params, len(models.experts))

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: DareParams, ctx: MergeContext
    ) -> torch.Tensor:
        densities = per_expert(params.density, len(experts))
        deltas = ctx.task_vectors(base, experts)
        sparse = [
            dare_task_vector(x, d, params.rescale, ctx, i) for i, (x, d) in enumerate(zip(deltas, densities))
        ]
        return torch.add(
            base,
            combine(sparse, params.weights, elect=self.elect, normalize=params.normalize),
            alpha=params.lambda_,
        )
