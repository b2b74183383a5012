"""task_arithmetic: θ_base + λ Σ w_i δ_i ("Editing Models with Task Arithmetic"; mergekit normalize=False)."""

from __future__ import annotations

from typing import Any

import torch

from workers.operators.base import MergeContext, MergekitForm, MergekitRead, Operator, register
from workers.operators.kernels import WeightedParams, combine, weighted_form, weighted_method, weighted_params
from workers.recipe import Models


class TaskArithmeticParams(WeightedParams):
    normalize: bool = False


@register
class TaskArithmetic(Operator):
    name = "task_arithmetic"
    Params = TaskArithmeticParams
    mergekit_import = weighted_method("task_arithmetic", normalize=False, rescale=False, density=False)

    def from_mergekit(self, read: MergekitRead) -> dict[str, Any]:
        return weighted_params(read)

    def to_mergekit(self, params: TaskArithmeticParams, models: Models) -> MergekitForm | str:
        return weighted_form("task_arithmetic", self.name, params, len(models.experts))

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: TaskArithmeticParams, ctx: MergeContext
    ) -> torch.Tensor:
        deltas = ctx.task_vectors(base, experts)
        return torch.add(
            base,
            combine(deltas, params.weights, elect=False, normalize=params.normalize),
            alpha=params.lambda_,
        )
