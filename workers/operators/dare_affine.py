"""dare_affine: θ_base + Σ_i dense_i δ_i + Σ_i sparse_i DARE(δ_i), PSO's exact low-dimensional form (§5).

A PSO position over the 2N + 1 basis models (base, experts, DARE-sparsified experts) is this affine
combination; the DARE masks come from the recipe seed, so a fixed seed fixes the basis the swarm moves in.
"""

from __future__ import annotations

import torch
from pydantic import Field

from workers.operators.base import MergeContext, Operator, OpParams, register
from workers.operators.kernels import (
    DareRescale,
    Density,
    check_per_expert,
    dare_task_vector,
    each_task_vector,
)
from workers.recipe import OpSpec


class DareAffineParams(OpParams):
    dense: list[float] = Field(min_length=1)
    sparse: list[float] = Field(min_length=1)
    density: Density = 0.2
    rescale: DareRescale = "inverse_p"


@register
class DareAffine(Operator):
    name = "dare_affine"
    Params = DareAffineParams
    random_masks = True

    def check(self, params: DareAffineParams, n_experts: int, models: tuple[str, ...]) -> None:
        check_per_expert("dense", params.dense, n_experts)
        check_per_expert("sparse", params.sparse, n_experts)

    def norm_average(self, params: DareAffineParams, n_experts: int) -> OpSpec:
        """The affine combination with undropped DARE particles (θ_base + DARE(δ_i) → θ_i): θ_base +
        Σ (dense_i + sparse_i) δ_i. Its coefficients and the base's sum to 1 already: no normalisation."""
        weights = [a + b for a, b in zip(params.dense, params.sparse)]
        return OpSpec(op="task_arithmetic", params={"weights": weights})

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: DareAffineParams, ctx: MergeContext
    ) -> torch.Tensor:
        out = base.clone()
        deltas = each_task_vector(base, experts, ctx)
        for i, (delta, a, b) in enumerate(zip(deltas, params.dense, params.sparse)):
            out.add_(delta, alpha=a)
            if b != 0.0:
                out.add_(dare_task_vector(delta, params.density, params.rescale, ctx, i), alpha=b)
        return out
