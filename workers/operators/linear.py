"""linear: the weighted average of the experts, Σ w_i θ_i / Σ w_i (Model Soups; mergekit normalize=True).

The base takes no part (§2.1); to include it, list its folder as an expert too.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from workers.operators.base import (
    MergeContext,
    MergekitForm,
    MergekitMethod,
    MergekitRead,
    Operator,
    OpParams,
    register,
)
from workers.operators.kernels import combine
from workers.recipe import Models


class LinearParams(OpParams):
    weights: list[float] = Field(min_length=1)
    normalize: bool = True


@register
class Linear(Operator):
    name = "linear"
    Params = LinearParams
    mergekit_import = MergekitMethod("linear", {"normalize": True}, {"weight": None}, uses_base=False)

    def from_mergekit(self, read: MergekitRead) -> dict[str, Any]:
        return {"weights": read.per_model["weight"], "normalize": read.shared["normalize"]}

    def to_mergekit(self, params: LinearParams, models: Models) -> MergekitForm:
        return MergekitForm("linear", {"normalize": params.normalize}, [{"weight": w} for w in params.weights])

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: LinearParams, ctx: MergeContext
    ) -> torch.Tensor:
        return combine(experts, params.weights, elect=False, normalize=params.normalize)
