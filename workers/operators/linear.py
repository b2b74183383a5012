"""linear: the weighted average of the experts, Σ w_i θ_i / Σ w_i (Model Soups; mergekit normalize=True)."""

from __future__ import annotations

import torch
from pydantic import Field

from workers.operators.base import MergeContext, Operator, OpParams, register


class LinearParams(OpParams):
    weights: list[float] = Field(min_length=1)
    normalize: bool = True


@register
class Linear(Operator):
    name = "linear"
    Params = LinearParams

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: LinearParams, ctx: MergeContext
    ) -> torch.Tensor:
        out = torch.zeros_like(base)
        for w, x in zip(params.weights, experts):
            out.add_(x, alpha=w)
        total = sum(params.weights)
        if params.normalize and abs(total) > 1e-8:
            out.div_(total)
        return out
