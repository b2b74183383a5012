"""della: DELLA's magnitude-ranked drop (MagPrune), then TIES's election and merge (§2.5; mergekit della).

Per row (a 1-D tensor is one row), entry j is kept with probability (d − ε) + 2ε·rank_j/(cols − 1), ranking
|δ| ascending (ties by index), so larger entries survive more often; kept entries are rescaled (mergekit: L1
match). `elect: false` is mergekit's della_linear. Masks come from the recipe's per-(tensor, model) generator.
"""

from __future__ import annotations

import torch
from pydantic import Field

from workers.operators.base import MergeContext, MergekitForm, Operator, register
from workers.operators.kernels import (
    KEEP_STEPS,
    DareRescale,
    DensitySetting,
    WeightedParams,
    check_densities,
    combine,
    dare_rescale,
    per_expert,
    u16_keep,
    weighted_form,
)
from workers.recipe import Models, OpTraits


class DellaParams(WeightedParams):
    density: DensitySetting = 0.5
    epsilon: float = Field(0.15, ge=0.0)
    rescale: DareRescale = "l1"
    normalize: bool = True
    elect: bool = True


def magprune_mask(
    delta: torch.Tensor, density: float, epsilon: float, ctx: MergeContext, model_index: int
) -> torch.Tensor:
    """Bernoulli keep-mask with per-row, rank-scaled keep probabilities, drawn on the CPU as the recipe's
    format says: torch's Bernoulli draws (/1), or `pcg64dxsm_u16`'s 16-bit draws, entry j kept when its draw is
    below round(p_j · 2^16) (/2; as `dare_masks` with a probability per entry)."""
    rows = (
        delta.detach().cpu().reshape(1, -1)
        if delta.dim() < 2
        else delta.detach().cpu().reshape(delta.shape[0], -1)
    )
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(rows.shape[1]).expand_as(order))
    span = max(rows.shape[1] - 1, 1)
    probs = (density - epsilon) + ranks.to(torch.float32) / span * 2 * epsilon
    if ctx.mask_draw == "torch_bernoulli":
        keep = torch.bernoulli(probs, generator=ctx.generator(model_index)).bool()
    else:
        keep = u16_keep(ctx.stream_seed(model_index), 0, probs.shape, probs.mul_(KEEP_STEPS).round_())
    return keep.reshape(delta.shape)


@register
class Della(Operator):
    name = "della"
    Params = DellaParams
    traits = OpTraits(trims=True)
    random_masks = True

    def check(self, params: DellaParams, n_experts: int, models: tuple[str, ...]) -> None:
        super().check(params, n_experts, models)
        check_densities(params, n_experts)
        for d in per_expert(params.density, n_experts):
            if d < 1.0 and not (0.0 < d - params.epsilon and d + params.epsilon < 1.0):
                raise ValueError(f"density {d} ± epsilon {params.epsilon} must lie in (0, 1)")

    def to_mergekit(self, params: DellaParams, models: Models) -> MergekitForm | str:
        method = "della" if params.elect else "della_linear"
        return weighted_form(method, self.name, params, len(models.experts))

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: DellaParams, ctx: MergeContext
    ) -> torch.Tensor:
        pruned = []
        deltas = ctx.task_vectors(base, experts)
        for i, (delta, d) in enumerate(zip(deltas, per_expert(params.density, len(experts)))):
            if d < 1.0:
                delta = dare_rescale(
                    delta, magprune_mask(delta, d, params.epsilon, ctx, i), d, params.rescale
                )
            pruned.append(delta)
        merged = combine(pruned, params.weights, elect=params.elect, normalize=params.normalize)
        return torch.add(base, merged, alpha=params.lambda_)
