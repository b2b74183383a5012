"""ties: TIES-Merging (trim, elect sign, disjoint merge), ALGORITHMS.md §2.4.

The election runs on the weighted vectors w_i·τ̂_i with mergekit's `Σ ≥ 0 → +1` rule; `normalize=False`
gives the disjoint weighted sum (mergekit's dare_ties default, CABS's TIES recipe), `rescale=True` adds
mergekit's L1 rescale after trimming.
"""

from __future__ import annotations

from typing import Any

import torch

from workers.operators.base import MergeContext, MergekitForm, MergekitRead, Operator, register
from workers.operators.kernels import (
    DensitySetting,
    WeightedParams,
    added_to_base,
    check_densities,
    combine,
    l1_rescale_each,
    per_expert,
    trim_task_vectors,
    trimmed_task_vectors,
    weighted_form,
    weighted_method,
    weighted_params,
)
from workers.recipe import Models, OpTraits


class TiesParams(WeightedParams):
    density: DensitySetting = 0.2
    normalize: bool = True
    rescale: bool = False


@register
class Ties(Operator):
    name = "ties"
    Params = TiesParams
    traits = OpTraits(trims=True)
    stored_inputs = True
    mergekit_import = weighted_method("ties", normalize=True, rescale=False)

    def check(self, params: TiesParams, n_experts: int, models: tuple[str, ...]) -> None:
        super().check(params, n_experts, models)
        check_densities(params, n_experts)

    def from_mergekit(self, read: MergekitRead) -> dict[str, Any]:
        return {**weighted_params(read), "rescale": read.shared["rescale"]}

    def to_mergekit(self, params: TiesParams, models: Models) -> MergekitForm | str:
        return weighted_form("ties", self.name, params, len(models.experts))

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: TiesParams, ctx: MergeContext
    ) -> torch.Tensor:
        densities = per_expert(params.density, len(experts))

        def mixed(trimmed: torch.Tensor) -> torch.Tensor:
            return combine(trimmed, params.weights, elect=True, normalize=params.normalize)

        if params.rescale:  # the L1 norms are the whole tensor's: no runs of rows
            deltas = ctx.task_vectors(base, experts)
            trimmed = l1_rescale_each(deltas, trim_task_vectors(deltas, densities, ctx))
            del deltas  # a one-off merge frees the untrimmed vectors before combining (its peak memory)
            return torch.add(base, mixed(trimmed), alpha=params.lambda_)
        runs = trimmed_task_vectors(base, experts, densities, ctx)
        parts = ((rows, mixed(trimmed)) for rows, trimmed in runs)
        return added_to_base(base, parts, params.lambda_, ctx.result(base))
