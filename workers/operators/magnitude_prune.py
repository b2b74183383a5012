"""magnitude_prune: task arithmetic on magnitude-trimmed task vectors (§2.3), no rescale.

`scope: each` trims every δ_i before the weighted sum ("TA + magnitude"); `scope: merged` trims the combined
Σ w_i δ_i once, which is how the SAE strategy prunes a child to a target sparsity.
"""

from __future__ import annotations

from typing import Literal

import torch

from workers.operators.base import MergeContext, Operator, register
from workers.operators.kernels import (
    DensitySetting,
    TopK,
    WeightedParams,
    added_to_base,
    by_rows,
    check_densities,
    combine,
    per_expert,
    row_runs,
    run_offset,
    task_vector_runs,
    top_k_count,
    trimmed_task_vectors,
)
from workers.recipe import OpTraits


class MagnitudePruneParams(WeightedParams):
    density: DensitySetting = 0.2
    scope: Literal["each", "merged"] = "each"


@register
class MagnitudePrune(Operator):
    name = "magnitude_prune"
    Params = MagnitudePruneParams
    traits = OpTraits(trims=True)
    stored_inputs = True

    def check(self, params: MagnitudePruneParams, n_experts: int, models: tuple[str, ...]) -> None:
        super().check(params, n_experts, models)
        check_densities(params, n_experts)
        if params.scope == "merged" and not isinstance(params.density, float):
            raise ValueError(
                "density must be one number with scope 'merged' (the merged vector is trimmed once)"
            )

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: MagnitudePruneParams, ctx: MergeContext
    ) -> torch.Tensor:
        if params.scope == "merged":  # by runs of rows, as `trimmed_task_vectors` (the same bits as whole)
            runs = task_vector_runs(base, experts, ctx)
            mixed = by_rows(
                base, ((r, combine(d, params.weights, elect=False, normalize=False)) for r, d in runs)
            )
            k = top_k_count(mixed.numel(), params.density)
            keep = TopK.of(mixed, k, zeros=False) if params.density < 1.0 else None  # a mask that multiplies
            out = ctx.result(base)
            for rows in row_runs(base):
                part = mixed[rows]
                if keep is not None and not keep.keeps_all:
                    part.mul_(keep.mask(part, run_offset(base, rows)))
                torch.add(base[rows], part, alpha=params.lambda_, out=out[rows])
            return out

        runs = trimmed_task_vectors(base, experts, per_expert(params.density, len(experts)), ctx)
        combined = ((rows, combine(t, params.weights, elect=False, normalize=False)) for rows, t in runs)
        return added_to_base(base, combined, params.lambda_, ctx.result(base))
