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
    dare_masks,
    dare_rescale,
    difference,
    row_runs,
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
    stored_inputs = True

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
        """Run by run of rows (the whole tensor when the rescale needs its norms: `l1`), each run's sum taken
        in float32 over every expert's terms in expert order, then written once into the result: the same bits
        as whole-tensor arithmetic, with every temporary a run's size (reused from the heap, in the CPU's
        caches) and the sources cast a run at a time. Task vectors are not kept: the memo's bytes serve the
        DARE masks, a 32nd of the size for a larger saving."""
        runs = [...] if params.rescale == "l1" else row_runs(base)
        drop = params.density < 1.0
        masks = [
            dare_masks(base.shape, runs, params.density, ctx, i) if drop and b != 0.0 else None
            for i, b in enumerate(params.sparse)
        ]
        out = ctx.result(base)
        for rows in runs:
            part = base[rows].float()  # cast once per run, not once per expert
            total = part.clone()
            for expert, a, b, mask in zip(experts, params.dense, params.sparse, masks):
                delta = difference(expert[rows], part)
                total.add_(delta, alpha=a)
                if mask is not None:
                    total.add_(dare_rescale(delta, next(mask), params.density, params.rescale), alpha=b)
                elif b != 0.0:
                    total.add_(delta, alpha=b)  # density 1 keeps every entry, unscaled, with no draw
            out[rows] = total
        return out
