"""copy: take the tensor unchanged from one named model (the base or an expert)."""

from __future__ import annotations

import torch

from workers.operators.base import MergeContext, Operator, OpParams, register


class CopyParams(OpParams):
    model: str


@register
class Copy(Operator):
    name = "copy"
    Params = CopyParams

    def check(self, params: CopyParams, n_experts: int, models: tuple[str, ...]) -> None:
        if params.model not in models:
            raise ValueError(f"model '{params.model}' is not one of {list(models)}")

    def norm_average(self, params: CopyParams, n_experts: int) -> None:
        """A copy already takes one model's norm whole: nothing to average."""

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: CopyParams, ctx: MergeContext
    ) -> torch.Tensor:
        if params.model == ctx.base_name:
            return base
        return experts[ctx.experts.index(params.model)]
