"""copy: take the tensor unchanged from one named model (the base or an expert)."""

from __future__ import annotations

from typing import Any

import torch

from workers.operators.base import (
    MergeContext,
    MergekitForm,
    MergekitMethod,
    MergekitRead,
    Operator,
    OpParams,
    register,
)
from workers.recipe import Models


class CopyParams(OpParams):
    model: str


@register
class Copy(Operator):
    name = "copy"
    Params = CopyParams
    stored_inputs = True
    mergekit_import = MergekitMethod("passthrough", per_model={"scale": 1.0}, uses_base=False)

    def check(self, params: CopyParams, n_experts: int, models: tuple[str, ...]) -> None:
        if params.model not in models:
            raise ValueError(f"model '{params.model}' is not one of {list(models)}")

    def norm_average(self, params: CopyParams, n_experts: int) -> None:
        """A copy already takes one model's norm whole: nothing to average."""

    def from_mergekit(self, read: MergekitRead) -> dict[str, Any] | str:
        """A passthrough slice's one model, copied."""
        model = read.present[0]
        if read.per_model["scale"][read.experts.index(model)] != 1.0:
            return f"passthrough 'scale' is not supported ({read.tensor})"
        return {"model": model}

    def to_mergekit(self, params: CopyParams, models: Models) -> MergekitForm:
        """Task arithmetic with weight 1 on the copied expert (all 0 for the base); a recipe of copies only
        is a passthrough frankenmerge instead (`workers.mergekit_config`)."""
        return MergekitForm(
            "task_arithmetic", {}, [{"weight": 1.0 if name == params.model else 0.0} for name in models.experts]
        )

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: CopyParams, ctx: MergeContext
    ) -> torch.Tensor:
        if params.model == ctx.base_name:
            return base
        return experts[ctx.experts.index(params.model)]
