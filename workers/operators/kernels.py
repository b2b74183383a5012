"""Tensor kernels shared by several operators: top-k trim, DARE drop and rescale, sign election.

They live in one place so that ties, dare_ties, magnitude_prune, della and breadcrumbs apply exactly the same
edge-case rules (ALGORITHMS.md §1.4): `k = int(d·n)` in float64, k = 0 with d > 0 becomes 1, magnitude ties
go to the lower flat index, `sign(0)` never votes, and a near-zero divisor becomes 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field

from workers.operators.base import MergeContext, OpParams

Density = Annotated[float, Field(gt=0.0, le=1.0)]
"""A kept fraction in (0, 1]; DARE's drop rate is p = 1 − density."""

DensitySetting = Density | list[Density]
"""One density for every expert, or one per expert (mergekit's per-model `density`)."""

DareRescale = Literal["inverse_p", "l1", "none"]
"""DARE rescale: the paper's 1/(1 − p), mergekit's per-tensor L1 match, or none."""

NORM_EPS = 1e-7
"""mergekit skips a norm rescale when either L1 norm is below this."""
DIVISOR_EPS = 1e-8


def per_expert(setting: float | Sequence[float], n_experts: int) -> list[float]:
    """Broadcast a scalar setting to one value per expert."""
    if isinstance(setting, (int, float)):
        return [float(setting)] * n_experts
    return [float(v) for v in setting]


def check_per_expert(name: str, setting: float | Sequence[float], n_experts: int) -> None:
    """Refuse a per-expert list whose length is not the number of experts (ValueError names the parameter)."""
    if not isinstance(setting, (int, float)) and len(setting) != n_experts:
        raise ValueError(f"{name} has {len(setting)} entries for {n_experts} experts")


def top_k_count(numel: int, density: float) -> int:
    """mergekit's k = int(d·n), computed in float64, at least 1 while d > 0."""
    if density >= 1.0:
        return numel
    if density <= 0.0:
        return 0
    return max(1, int(density * numel))


EXACT_FLOAT_RANKS = 2**24
"""float32 holds every integer up to 2^24 exactly; larger tensors keep their ranks as int32."""


def magnitude_rank(x: torch.Tensor) -> torch.Tensor:
    """Each entry's position when |x| is sorted largest first, equal magnitudes by lower flat index, so that
    `rank < k` is exactly `top_k_mask(x, k)` for any k. Stored as float32 where exact (the mask is then float
    arithmetic, about 3x faster than a boolean comparison on CPU), else int32."""
    n = x.numel()
    dtype = torch.float32 if n <= EXACT_FLOAT_RANKS else torch.int32
    order = torch.sort(x.abs().reshape(-1), descending=True, stable=True).indices
    rank = torch.empty(n, dtype=dtype, device=x.device)
    rank[order] = torch.arange(n, dtype=dtype, device=x.device)
    return rank.reshape(x.shape)


def below(rank: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """The keep-mask `rank < k` as float32 1/0, computed without a boolean tensor when ranks are floats."""
    if rank.is_floating_point():
        return (k - rank).clamp_(0.0, 1.0)  # integers: k − rank ≥ 1 exactly when rank < k
    return (rank < k).to(torch.float32)


def count_nonzero_(x: torch.Tensor) -> int:
    """How many entries of `x` are nonzero; overwrites `x`. Branch-free float arithmetic: torch.count_nonzero
    is up to 10x slower on CPU when zeros and nonzeros mix, as in a pruned merge. A float32 sum of ones is
    exact up to 2^24, so larger tensors are summed in float64."""
    dtype = torch.float32 if x.numel() <= EXACT_FLOAT_RANKS else torch.float64
    return int(x.sign_().abs_().sum(dtype=dtype).item())


def top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest |x|; equal magnitudes go to the lower flat index (deterministic ties).

    Uses the k-th value and a scan of the ties instead of a full sort: O(n) and no int64 index tensor.
    """
    mag = x.abs().reshape(-1)
    n = mag.numel()
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    kth = torch.kthvalue(mag, n - k + 1).values
    mask = mag >= kth
    extra = int(mask.sum()) - k  # > 0 only when the k-th value has ties: keep the lowest-indexed of them
    if extra > 0:
        ties = torch.nonzero(mag == kth).reshape(-1)
        mask[ties[len(ties) - extra :]] = False
    return mask.reshape(x.shape)


def trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """Magnitude pruning: keep the int(d·n) largest |x| (§2.3), no rescale."""
    if density >= 1.0:
        return x
    return x * top_k_mask(x, top_k_count(x.numel(), density))


def ranked_band(
    deltas: torch.Tensor, lows: Sequence[int], highs: Sequence[int], ctx: MergeContext
) -> torch.Tensor:
    """[K, ...] float 1/0: 1 where row i's magnitude rank r satisfies lows[i] ≤ r < highs[i], for the task
    vectors `deltas` of `ctx.task_vectors`. A worker's memo keeps their magnitude ranks, so after the first
    candidate a band at any bounds is float arithmetic instead of K k-th value searches."""
    if ctx.memo is None:
        masks = []
        for row, lo, hi in zip(deltas, lows, highs):
            mask = top_k_mask(row, hi)
            if lo:
                mask &= ~top_k_mask(row, lo)
            masks.append(mask)
        return torch.stack(masks).to(deltas.dtype)
    ranks = ctx.remember("magnitude_ranks", lambda: torch.stack([magnitude_rank(row) for row in deltas]))

    def column(values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=ranks.dtype, device=ranks.device).reshape(
            -1, *[1] * (ranks.dim() - 1)
        )

    band = below(ranks, column(highs))
    return band.sub_(below(ranks, column(lows))) if any(lows) else band


def trim_task_vectors(deltas: torch.Tensor, densities: Sequence[float], ctx: MergeContext) -> torch.Tensor:
    """`trim` of each expert's task vector (the rows of `ctx.task_vectors`) at its density."""
    if min(densities) >= 1.0:
        return deltas
    n = deltas[0].numel()
    return ranked_band(deltas, [0] * len(densities), [top_k_count(n, d) for d in densities], ctx).mul_(deltas)


def breadcrumbs_masks(
    deltas: torch.Tensor, densities: Sequence[float], gamma: float, ctx: MergeContext
) -> torch.Tensor:
    """Model Breadcrumbs on each expert's task vector: drop the int(γ·n) largest |δ| (outliers), keep the next
    int(d·n) (§2.5, mergekit 0.1.5: exactly int(d·n) kept; fewer outliers dropped when both do not fit); an
    expert at density ≥ 1 keeps everything. Float 1/0, [K, ...]."""
    n = deltas[0].numel()
    keeps = [top_k_count(n, d) for d in densities]
    outliers = [min(int(gamma * n), n - keep) if d < 1.0 else 0 for keep, d in zip(keeps, densities)]
    return ranked_band(deltas, outliers, [o + keep for o, keep in zip(outliers, keeps)], ctx)


def l1_rescale(original: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Scale `masked` so its L1 norm matches `original`'s; skipped when either norm is tiny (mergekit)."""
    before = original.abs().sum()
    after = masked.abs().sum()
    if before < NORM_EPS or after < NORM_EPS:
        return masked
    return masked * (before / after)


def l1_rescale_each(originals: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """`l1_rescale` of each row of [K, ...] task vectors."""
    return torch.stack([l1_rescale(o, m) for o, m in zip(originals, masked)])


def dare_mask(shape: torch.Size, density: float, ctx: MergeContext, model_index: int) -> torch.Tensor:
    """Bernoulli(density) keep-mask, drawn on the CPU from the recipe's per-(tensor, model) generator.

    Drawing on the CPU makes the mask the same on every device, so a recipe is reproducible anywhere.
    """
    keep = torch.full(tuple(shape), density, dtype=torch.float32)
    return torch.bernoulli(keep, generator=ctx.generator(model_index)).bool()


def dare_rescale(
    delta: torch.Tensor, mask: torch.Tensor, density: float, rescale: DareRescale
) -> torch.Tensor:
    """Apply a keep-mask and DARE's rescale (§2.5): ×1/(1−p), mergekit's L1 match, or nothing."""
    masked = delta * mask.to(delta.device)
    if rescale == "inverse_p":
        return masked / density
    if rescale == "l1":
        return l1_rescale(delta, masked)
    return masked


def dare_task_vector(
    delta: torch.Tensor, density: float, rescale: DareRescale, ctx: MergeContext, model_index: int
) -> torch.Tensor:
    """DARE drop-and-rescale of expert `model_index`'s task vector; density ≥ 1 returns it unchanged with no
    RNG draw. The mask depends only on (seed, tensor, model, density), and a search keeps one recipe seed for
    the whole run, so a worker's memo draws it once (shared result: do not modify it)."""
    if density >= 1.0:
        return delta
    return ctx.remember(
        f"dare:{ctx.seed}:{density!r}:{rescale}",
        lambda: dare_rescale(delta, dare_mask(delta.shape, density, ctx, model_index), density, rescale),
        model_index,
    )


def combine(
    deltas: torch.Tensor | Sequence[torch.Tensor], weights: Sequence[float], *, elect: bool, normalize: bool
) -> torch.Tensor:
    """Σ w_i δ_i, optionally restricted to the elected sign and divided by the agreeing weights (§2.4).

    With `elect`, γ = +1 where Σ_i w_i δ_i ≥ 0 else −1 (mergekit's mass election; exact 0 → +1), and only
    entries whose sign(w_i δ_i) equals γ contribute, so zeros never vote. With `normalize` the sum is divided
    by Σ w_i over contributing models (the disjoint mean), a divisor below 1e-8 in magnitude counting as 1.
    `deltas` is [K, ...] (as `MergeContext.task_vectors` gives) or a list, stacked here: every step is one
    operation over all experts, in float arithmetic only (boolean masks cost 5-30x more per entry on CPU).
    """
    stacked = deltas if isinstance(deltas, torch.Tensor) else torch.stack(list(deltas))
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    if not elect:  # one matrix-vector product: reads the K vectors once, writes only the sum
        total = (w @ stacked.reshape(len(weights), -1)).reshape(stacked.shape[1:])
        if normalize:
            divisor = sum(weights)
            if abs(divisor) >= DIVISOR_EPS:
                total.div_(divisor)
        return total
    w = w.reshape(-1, *[1] * (stacked.dim() - 1))
    weighted = stacked * w
    gamma = weighted.sum(0).sign_().add_(0.5).sign_()  # in place: +1 where Σ ≥ 0 (±0 included), else −1
    agreeing = weighted.mul_(gamma).clamp_min_(0.0)  # |w·δ| where sign(w·δ) = γ, else 0
    mixed = agreeing.sum(0).mul_(gamma)
    if normalize:
        divisor = agreeing.sign_().mul_(w).sum(0)
        if min(weights) >= DIVISOR_EPS:
            # Positive weights: a divisor below ε is 0, where `mixed` is 0 too, so clamping is the same rule.
            divisor.clamp_min_(DIVISOR_EPS)
        else:
            divisor[divisor.abs() < DIVISOR_EPS] = 1.0
        mixed.div_(divisor)
    return mixed


class WeightedParams(OpParams):
    """Parameters of every operator that scales per-expert task vectors: w_i and the global λ."""

    weights: list[float] = Field(min_length=1)
    lambda_: float = Field(1.0, alias="lambda")


def check_densities(params: OpParams, n_experts: int) -> None:
    """Shared `check` step for operators with a per-expert `density` setting."""
    check_per_expert("density", params.density, n_experts)  # type: ignore[attr-defined]
