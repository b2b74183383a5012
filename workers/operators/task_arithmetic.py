"""task_arithmetic: θ_base + λ Σ w_i δ_i ("Editing Models with Task Arithmetic"; mergekit normalize=False)."""

from __future__ import annotations

import torch
from pydantic import Field

from workers.operators.base import MergeContext, Operator, OpParams, register


class TaskArithmeticParams(OpParams):
    weights: list[float] = Field(min_length=1)
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = False


@register
class TaskArithmetic(Operator):
    name = "task_arithmetic"
    Params = TaskArithmeticParams

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: TaskArithmeticParams, ctx: MergeContext
    ) -> torch.Tensor:
        delta = torch.zeros_like(base)
        for w, x in zip(params.weights, experts):
            delta.add_(x - base, alpha=w)
        total = sum(params.weights)
        if params.normalize and abs(total) > 1e-8:
            delta.div_(total)
        return base + params.lambda_ * delta
