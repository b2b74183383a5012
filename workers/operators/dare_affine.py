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
    Rows,
    check_per_expert,
    dare_kind,
    dare_masks,
    dare_rescale,
    dare_task_vector,
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
        """Expert by expert, each by runs of rows unless the memo keeps (or has room for) its DARE vector or
        the rescale needs the whole tensor's norm (`l1`): whole-tensor temporaries of every size left the
        heap's free space too fragmented to reuse (+0.9 GB over a candidate at 2 GB float32). The runs' masks
        joined are the whole tensor's (`dare_masks`), and every step is elementwise: same bits."""
        out = base.clone()
        runs = row_runs(base)
        kind = dare_kind(params.density, params.rescale, ctx)
        memo_deltas = ctx.remembers("task_vectors", len(experts) * base.numel() * 4)

        def task_vector(i: int, rows: Rows) -> torch.Tensor:  # memo rows, else computed one expert at a time
            if memo_deltas:
                return ctx.task_vectors(base, experts)[i, rows]
            return experts[i][rows] - base[rows]

        for i, (a, b) in enumerate(zip(params.dense, params.sparse)):
            whole = len(runs) == 1 or params.density >= 1.0 or params.rescale == "l1"
            if b == 0.0 or whole or ctx.remembers(kind, base.numel() * 4, i):
                delta = task_vector(i, ...)
                out.add_(delta, alpha=a)
                if b != 0.0:
                    out.add_(dare_task_vector(delta, params.density, params.rescale, ctx, i), alpha=b)
                continue
            for rows, mask in zip(runs, dare_masks(base.shape, runs, params.density, ctx, i)):
                delta = task_vector(i, rows)
                part = out[rows]
                part.add_(delta, alpha=a)
                part.add_(dare_rescale(delta, mask, params.density, params.rescale), alpha=b)
        return out
