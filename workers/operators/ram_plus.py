"""ram_plus: RAM+ (mergekit `ramplus_tl`), RAM with unique entries boosted by their expert's overlap ratio.

ρ_k = |shared ∩ active_k| / |unique_k| per tensor (0 when expert k has no unique entry), and unique entries of
expert k are scaled by 1 + r·clip(ρ_k, 0, α): at most 1.02 with the defaults (§2.8).
"""

from __future__ import annotations

import torch
from pydantic import Field

from workers.operators.base import MergeContext, MergekitForm, Operator, OpParams, register
from workers.operators.ram import epsilon_active, ram_combine
from workers.recipe import Models


class RamPlusParams(OpParams):
    r: float = Field(0.1, ge=0.0)
    alpha: float = Field(0.2, ge=0.0)
    epsilon: float = Field(1e-5, ge=0.0)


@register
class RamPlus(Operator):
    name = "ram_plus"
    Params = RamPlusParams

    def to_mergekit(self, params: RamPlusParams, models: Models) -> MergekitForm:
        shared = {"r": params.r, "alpha": params.alpha, "epsilon": params.epsilon}
        return MergekitForm("ramplus_tl", shared, [{}] * len(models.experts))

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: RamPlusParams, ctx: MergeContext
    ) -> torch.Tensor:
        deltas = ctx.task_vectors(base, experts)
        active = epsilon_active(deltas, params.epsilon)
        count = active.sum(0)
        scales = []
        for a in active:
            n_unique = int((a & (count == 1)).sum())
            rho = int((a & (count >= 2)).sum()) / n_unique if n_unique else 0.0
            scales.append(1.0 + params.r * min(max(rho, 0.0), params.alpha))
        return base + ram_combine(deltas, active, scales, "count")
