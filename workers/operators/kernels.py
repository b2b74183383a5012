"""Tensor kernels shared by several operators: top-k trim, DARE drop and rescale, sign election.

They live in one place so that ties, dare_ties, magnitude_prune, della and breadcrumbs apply exactly the same
edge-case rules (ALGORITHMS.md §1.4): `k = int(d·n)` in float64, k = 0 with d > 0 becomes 1, magnitude ties
go to the lower flat index, `sign(0)` never votes, and a near-zero divisor becomes 1.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import EllipsisType
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field

from workers.operators.base import MergeContext, MergekitForm, MergekitMethod, MergekitRead, OpParams

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


NUMPY_SELECT = (torch.float32, torch.float64, torch.float16)


def kth_smallest_(x: torch.Tensor, q: int) -> torch.Tensor:
    """`torch.kthvalue(x, q).values` of a 1-D tensor (q from 1), as a 0-d tensor; may reorder `x`. On CPU
    numpy's introselect finds the same value 10-12x faster than torch's (0.06 against 0.7 ms for 64k
    entries), in place; torch's stays on other devices (no copy to the host)."""
    if not _numpy_selects(x):
        return torch.kthvalue(x, q).values
    values = x.numpy()
    values.partition(q - 1)
    return torch.tensor(values[q - 1])


def kth_smallest(x: torch.Tensor, q: int) -> torch.Tensor:
    """`kth_smallest_` that leaves `x` as it is."""
    return kth_smallest_(x.clone() if _numpy_selects(x) else x, q)


def _numpy_selects(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in NUMPY_SELECT and x.is_contiguous()


def selected(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x[keep] for a boolean `keep`; on CPU through numpy, whose boolean indexing is 3x faster than torch's
    (0.8 against 2.5 ns an entry, comparisons included): it gathered a third of a dense TIES candidate."""
    if _numpy_selects(x):
        return torch.from_numpy(x.numpy()[keep.numpy()])
    return x[keep]


def count_true(mask: torch.Tensor) -> int:
    """True entries of a boolean tensor. On CPU through numpy: torch's sum of a bool tensor materialises an
    int64 copy (8 bytes an entry) and torch.count_nonzero is slow where True and False mix."""
    if mask.device.type == "cpu":
        return int(np.count_nonzero(mask.numpy()))
    return int(mask.sum())


TIE_SCAN = 1 << 20
"""Entries per step when looking for the last kept tie (no index tensor over a whole large tensor)."""

MAGNITUDE_SHIFT = 20
"""Magnitude counts group |x| by the 11 high bits of its float32 pattern: 8 exponent and 3 mantissa bits."""
MAGNITUDE_SLOTS = (0x7FFFFFFF >> MAGNITUDE_SHIFT) + 2
"""Slot 0 counts exact zeros (±0); slot j ≥ 1 the nonzero |x| whose pattern, shifted, is j − 1."""
MAGNITUDE_COUNTS_BYTES = MAGNITUDE_SLOTS * 8
"""What one expert's counts of one tensor cost a worker's memo (int64)."""


def magnitude_counts(x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """[MAGNITUDE_SLOTS] int64: how many entries of float32 `x` (or of x − `base`, a task vector that is then
    never whole: a transient the size of the tensor grew a worker's heap by 2 GB in its first candidate) fall
    in each magnitude slot, counted run by run.

    The bit patterns of non-negative floats are ordered as their values, so the counts say how many entries
    are nonzero and in which slot the k-th largest |x| lies, with how many above it: a k-th value search then
    selects among that slot's entries only (a small share of the tensor), and needs no pass at all when a
    trim keeps every nonzero entry. A worker's memo keeps them for every tensor (16 KB per expert).
    """
    if base is None and x.dtype != torch.float32:
        raise TypeError(f"magnitude counts are of float32 tensors, not {x.dtype}")
    counts = torch.zeros(MAGNITUDE_SLOTS, dtype=torch.int64, device=x.device)
    flat, step = x.reshape(-1), CHUNK_BYTES // 4  # runs the size of a merge's: the heap reuses them
    for start in range(0, flat.numel(), step):
        run = flat[start : start + step]
        run = difference(run, base.reshape(-1)[start : start + step]) if base is not None else run.clone()
        bits = run.view(torch.int32).bitwise_and_(0x7FFFFFFF)
        nonzero = bits != 0
        counts += torch.bincount(
            bits.bitwise_right_shift_(MAGNITUDE_SHIFT).add_(nonzero), minlength=MAGNITUDE_SLOTS
        )
    return counts


def slot_bounds(slot: int) -> tuple[float, float]:
    """The magnitudes [low, high) of a nonzero slot (≥ 1) of `magnitude_counts`, as floats."""
    low, high = max((slot - 1) << MAGNITUDE_SHIFT, 1), slot << MAGNITUDE_SHIFT
    return tuple(struct.unpack("<2f", struct.pack("<2I", low, min(high, 0x7F800000))))  # type: ignore[return-value]


def magnitude_summary(
    ctx: MergeContext, model_index: int, x: torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor | None:
    """`magnitude_counts` of expert `model_index`'s task vector (`x`, or x − `base`), which a worker's memo keeps
    for every tensor (in its reserved share), or None where it does not (a one-off merge counts as it goes)."""
    kind = "magnitude_counts"
    if not ctx.remembers(kind, MAGNITUDE_COUNTS_BYTES, model_index, summary=True):
        return None
    return ctx.remember(kind, lambda: magnitude_counts(x, base), model_index, summary=True)


def keeps_nonzeros(k: int, n: int, counts: torch.Tensor | None) -> bool:
    """Whether the k largest magnitudes of n entries (with these `magnitude_counts`, where known) include every
    nonzero entry: a trim that multiplies them then changes nothing (a kept or dropped zero times 1 or 0 is
    itself, ±0 alike)."""
    return k >= n or (counts is not None and n - int(counts[0]) <= k)


@dataclass(frozen=True)
class TopK:
    """The k largest |x| of a whole tensor as a rule that any run of its rows can apply: keep |x| > `value`,
    and |x| = `value` up to flat index `last` (equal magnitudes go to the lower flat index). A one-off merge
    finds it once per tensor and then trims row chunks, so the threshold stays global to the tensor."""

    value: torch.Tensor | float
    last: int

    @property
    def keeps_all(self) -> bool:
        """Whether it keeps every entry (|x| ≥ 0 > value): a mask of it would be all True."""
        return float(self.value) < 0

    @classmethod
    def of(cls, x: torch.Tensor, k: int, zeros: bool = True, counts: torch.Tensor | None = None) -> TopK:
        """O(n): a k-th value search and, only when the k-th value has ties, a chunked scan for the last one
        kept (no sort, no int64 index tensor). `zeros=False` is for a mask that only multiplies `x`, where a
        kept 0 changes nothing: when fewer than k entries are nonzero it keeps every entry, with no scan for
        the last kept 0 (a sparse task vector's usual case). `counts`, the `magnitude_counts` of `x` (a
        worker's memo keeps them), replace the count of nonzeros and narrow the search to one slot."""
        n = x.numel()
        if k >= n:
            return cls(-1.0, n)
        if k <= 0:
            return cls(float("inf"), -1)
        flat = x.reshape(-1)
        scans = range(0, n, TIE_SCAN)
        if counts is None:
            nonzero = sum(count_true(run.abs() > 0) for run in flat.split(TIE_SCAN))
        else:
            nonzero = n - int(counts[0])
        if nonzero < k and not zeros:
            return cls(-1.0, n)
        if nonzero < k:  # the k-th magnitude is 0: keep every nonzero entry and the first zeros
            kth = torch.zeros((), dtype=x.dtype, device=x.device)
            wanted, n_ties = k - nonzero, n - nonzero
        else:
            kth, wanted, n_ties = kth_magnitude(flat, k, nonzero, counts)
        if n_ties <= wanted:
            return cls(kth, n)
        seen = 0
        for start in scans:
            ties = flat[start : start + TIE_SCAN].abs() == kth
            count = count_true(ties)
            if seen + count >= wanted:
                return cls(kth, start + int(torch.nonzero(ties)[wanted - seen - 1]))
            seen += count
        raise AssertionError("fewer ties than counted")  # unreachable: the counts above include them

    def mask(self, rows: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Boolean keep-mask of `rows`, the entries of the whole tensor from flat index `offset` on."""
        mag = rows.abs().reshape(-1)
        cut = self.last + 1 - offset  # entries before `cut` keep their ties
        if cut >= mag.numel():
            return (mag >= self.value).reshape(rows.shape)
        keep = mag > self.value
        if cut > 0:
            keep[:cut] |= mag[:cut] == self.value
        return keep.reshape(rows.shape)


def kth_magnitude(
    flat: torch.Tensor, k: int, nonzero: int, counts: torch.Tensor | None = None
) -> tuple[torch.Tensor, int, int]:
    """The k-th largest |x| of 1-D `flat` (k ≤ its `nonzero` entries), how many entries of that magnitude the
    top k keep (≥ 1) and how many there are. Selects among the entries of its `magnitude_counts` slot when
    `counts` are given; else among the nonzeros when they are under half (introselect is ~10x slower on an
    array of mostly equal values), gathered run by run so that no whole-tensor |x| or mask is allocated
    (fresh pages cost more than the arithmetic); else among all entries."""
    runs = (run.abs() for run in flat.split(TIE_SCAN))
    rank = k  # from the top, among the selected entries
    if counts is not None:
        above_or_in = counts.flip(0).cumsum(0)  # [m]: entries in the top m + 1 slots
        top = int(torch.searchsorted(above_or_in, k))
        slot = MAGNITUDE_SLOTS - 1 - top
        rank = k - (int(above_or_in[top]) - int(counts[slot]))
        low, high = slot_bounds(slot)
        mag = torch.cat([selected(run, (run >= low) & (run < high)) for run in runs])
    elif 2 * nonzero < flat.numel():
        mag = torch.cat([selected(run, run > 0) for run in runs])
    else:
        mag = flat.abs()
    kth = kth_smallest_(mag, mag.numel() - rank + 1)  # reorders `mag`: only order-free counts are read
    return kth, rank - count_true(mag > kth), count_true(mag == kth)


def top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest |x|; equal magnitudes go to the lower flat index (deterministic ties)."""
    return TopK.of(x, k).mask(x)


def trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """Magnitude pruning: keep the int(d·n) largest |x| (§2.3), no rescale."""
    if density >= 1.0:
        return x
    return x * top_k_mask(x, top_k_count(x.numel(), density))


def ranked_band(
    deltas: torch.Tensor, lows: Sequence[int], highs: Sequence[int], ctx: MergeContext
) -> torch.Tensor:
    """[K, ...] float 1/0: 1 where row i's magnitude rank r satisfies lows[i] ≤ r < highs[i], for the task
    vectors `deltas` of `ctx.task_vectors` (`band_of_rows` on the whole tensor). A band multiplies its task
    vectors, so where δ = 0 it may be 1 either way."""
    return band_of_rows(deltas, lows, highs, ctx)(...)


def band_of_rows(
    deltas: torch.Tensor, lows: Sequence[int], highs: Sequence[int], ctx: MergeContext
) -> Callable[[Rows], torch.Tensor]:
    """`ranked_band` as a function of a run of the tensors' rows, so that a kernel works on runs small enough
    for the allocator to reuse (a fresh allocation over 32 MB is new pages: page faults cost more than the
    arithmetic on them). A worker's memo keeps the magnitude ranks, so after the first candidate a band at any
    bounds is float arithmetic instead of K k-th value searches. Ranks the memo has no room for are not
    computed (a sort costs several k-th value searches): each row's `TopK` rules are found once instead."""
    if not ctx.remembers("magnitude_ranks", deltas.numel() * 4):
        counts = [magnitude_summary(ctx, i, row) for i, row in enumerate(deltas)]
        cuts = [band_cuts(row, lo, hi, c) for row, lo, hi, c in zip(deltas, lows, highs, counts)]
        return lambda rows: band_rows(deltas[:, rows], cuts, run_offset(deltas[0], rows))
    ranks = ctx.remember("magnitude_ranks", lambda: torch.stack([magnitude_rank(row) for row in deltas]))

    def column(values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=ranks.dtype, device=ranks.device).reshape(
            -1, *[1] * (ranks.dim() - 1)
        )

    high, low = column(highs), column(lows)

    def band(rows: Rows) -> torch.Tensor:
        ranked = ranks[:, rows]
        kept = below(ranked, high)
        return kept.sub_(below(ranked, low)) if any(lows) else kept

    return band


Band = tuple[TopK, TopK | None]
"""Keep the magnitudes the first rule keeps and the second (if any) does not: ranks in [lo, hi)."""


def band_cuts(delta: torch.Tensor, lo: int, hi: int, counts: torch.Tensor | None = None) -> Band | None:
    """The rules of ranks [lo, hi) of a task vector, for a band that multiplies it (kept zeros do nothing), or
    None where the band keeps every nonzero entry. `counts`: its `magnitude_counts`, where known."""
    if lo == 0 and keeps_nonzeros(hi, delta.numel(), counts):
        return None
    keep = TopK.of(delta, hi, zeros=False, counts=counts)
    return keep, (TopK.of(delta, lo, zeros=False, counts=counts) if lo else None)


def band_mask(row: torch.Tensor, cut: Band, offset: int = 0) -> torch.Tensor:
    """Boolean band of one task vector's rows, from flat index `offset` of the whole tensor on."""
    keep, drop = cut
    mask = keep.mask(row, offset)
    if drop is not None:
        mask &= ~drop.mask(row, offset)
    return mask


def band_rows(deltas: torch.Tensor, cuts: Sequence[Band | None], offset: int = 0) -> torch.Tensor:
    """[K, ...] float 1/0 of each row's band (1 for a row without a cut), for rows of the whole tensors from
    flat index `offset` on."""
    band = torch.empty_like(deltas)
    for row, out, cut in zip(deltas, band, cuts):
        if cut is None:
            out.fill_(1.0)
        else:
            out.copy_(band_mask(row, cut, offset))
    return band


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


CHUNK_BYTES = 1024**2
"""Merges of larger tensors work on runs of rows of about this many bytes per expert: a run's temporaries
([K, run] and a few [run]) then stay in the CPU's caches. A steady TIES candidate at 2 GB float32 took
4.2 CPU s with runs of 1 MB or 512 KB, 4.6-4.8 with 256 or 128 KB (more calls) and 6.0 with 4 MB."""


Rows = slice | EllipsisType
"""A run of a tensor's rows, or `...` for the whole tensor (which, unlike `slice(None)`, also indexes a 0-d
tensor such as GPT-NeoX's `attention.masked_bias`)."""


def row_runs(x: torch.Tensor) -> list[Rows]:
    """Runs of `x`'s rows of about CHUNK_BYTES per expert; one run (`...`) for a small or 1-D tensor."""
    if x.dim() < 2 or x.numel() * x.element_size() <= CHUNK_BYTES:
        return [...]
    per_row = x[0].numel() * x.element_size()
    step = max(1, CHUNK_BYTES // per_row)
    return [slice(start, start + step) for start in range(0, x.shape[0], step)]


def run_offset(x: torch.Tensor, rows: Rows) -> int:
    """The flat index in `x` where a run of its rows starts."""
    return 0 if rows is ... else rows.start * x[0].numel()  # type: ignore[union-attr]


def difference(x: torch.Tensor, base: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x − base in float32 (into `out` if given), from sources of any float dtype: a bfloat16 or float16
    source is cast first, as a float32 copy of it would be (torch subtracts two bfloat16 tensors in
    bfloat16, rounding the difference). Casting a run at a time is what lets an operator take its sources as
    stored (`Operator.stored_inputs`): no float32 copy of a whole tensor is ever made. A caller with several
    `x` passes the base's run cast once (on the CPU, torch casts a mixed-dtype operand by a copy anyway)."""
    if x.dtype == base.dtype == torch.float32:
        return torch.sub(x, base, out=out)
    if out is None:
        return x.to(torch.float32, copy=True).sub_(base)
    return out.copy_(x).sub_(base)


def task_vector_runs(
    base: torch.Tensor, experts: Sequence[torch.Tensor], ctx: MergeContext
) -> Iterator[tuple[Rows, torch.Tensor]]:
    """(rows, [K, rows...] task vectors on those rows) over the whole tensor: slices of `ctx.task_vectors` when
    the memo keeps them (or the tensor is one run), else computed run by run, never stacked whole."""
    runs = row_runs(base)
    if len(runs) == 1 or ctx.remembers("task_vectors", len(experts) * base.numel() * 4):
        deltas = ctx.task_vectors(base, list(experts))
        yield from ((rows, deltas[:, rows]) for rows in runs)
        return
    for rows in runs:
        part = base[rows].float()  # cast once per run, not once per expert
        deltas = torch.empty((len(experts), *part.shape), dtype=torch.float32, device=part.device)
        for delta, expert in zip(deltas, experts):  # one pass each (a stack and then a subtraction: two)
            difference(expert[rows], part, out=delta)
        yield rows, deltas


def trimmed_task_vectors(
    base: torch.Tensor, experts: Sequence[torch.Tensor], densities: Sequence[float], ctx: MergeContext
) -> Iterator[tuple[Rows, torch.Tensor]]:
    """(rows, [K, rows...] `trim` of each expert's task vector on those rows), over the whole tensor.

    Work goes by runs of rows, each run's temporaries a few runs' worth instead of K + 1 copies of the
    tensor: the allocator reuses them (no page faults), and in a one-off merge the largest tensor (the
    embedding) no longer sets the process's peak memory. Task vectors and ranks the memo keeps are sliced;
    task vectors it does not keep are never stacked whole: each expert's threshold is found on its own task
    vector (one at a time). All give the same bits: every later step is elementwise across experts.
    """
    runs, k, n = row_runs(base), len(experts), base.numel()
    highs = [top_k_count(n, d) for d in densities]
    if len(runs) == 1 or ctx.remembers("task_vectors", k * n * 4):
        deltas = ctx.task_vectors(base, list(experts))
        counts = [magnitude_summary(ctx, i, row) for i, row in enumerate(deltas)]
        if all(keeps_nonzeros(high, n, c) for high, c in zip(highs, counts)):
            yield from ((rows, deltas[:, rows]) for rows in runs)  # every trim keeps every nonzero entry
            return
        band = band_of_rows(deltas, [0] * k, highs, ctx)
        yield from ((rows, band(rows).mul_(deltas[:, rows])) for rows in runs)
        return
    counts = [magnitude_summary(ctx, i, e, base) for i, e in enumerate(experts)]
    cuts = [
        None if keeps_nonzeros(high, n, c) else band_cuts(difference(e, base), 0, high, c)
        for e, high, c in zip(experts, highs, counts)
    ]
    for rows, deltas in task_vector_runs(base, experts, ctx):
        for row, cut in zip(deltas, cuts):  # the run is this function's own: trimmed in place
            if cut is not None:
                row.mul_(band_mask(row, cut, run_offset(base, rows)))
        yield rows, deltas


def by_rows(base: torch.Tensor, parts: Iterator[tuple[Rows, torch.Tensor]]) -> torch.Tensor:
    """The float32 tensor of `base`'s shape assembled from (rows, values) runs; a single run is returned as is."""
    out: torch.Tensor | None = None
    for rows, part in parts:
        if rows is ...:
            return part
        if out is None:
            out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
        out[rows] = part
    assert out is not None, "no rows"
    return out


def added_to_base(
    base: torch.Tensor, parts: Iterator[tuple[Rows, torch.Tensor]], alpha: float, out: torch.Tensor
) -> torch.Tensor:
    """base + alpha · values into `out` (`MergeContext.result`), from (rows, values) runs over the whole
    tensor: each run's sum is written straight into the result (assembling the values first and adding them
    after is a pass more). A bfloat16 base is added in float32 (torch promotes it), and the sum is rounded
    once, as it is written."""
    for rows, part in parts:
        torch.add(base[rows], part, alpha=alpha, out=out[rows])
    return out


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


KEEP_STEPS = 1 << 16
"""A `pcg64dxsm_u16` keep probability p is round(p · 2^16) of the 2^16 values a 16-bit draw can take."""


def uniform_u16(stream_seed: int, start: int, count: int) -> np.ndarray:
    """Draws [start, start + count) of a stream of uniform 16-bit integers: numpy's PCG64DXSM seeded with
    `stream_seed` (through numpy's SeedSequence, as `PCG64DXSM(stream_seed)` does), each 64-bit output read
    as four draws, its least significant 16 bits first, on any byte order. numpy keeps bit generators'
    streams fixed across versions. A run costs the same wherever it starts: `advance` jumps over the outputs
    before it, so every run of a tensor is drawn alone, and only its own draws are held. PCG64DXSM rather
    than PCG64: the same state and `advance`, 1.5x faster outputs (2.0 against 2.9 ns here; its multiplier
    is 64-bit), and numpy's recommended variant for many parallel streams."""
    bits = np.random.PCG64DXSM(stream_seed)
    bits.advance(start // 4)
    skip = start % 4
    raw = bits.random_raw((skip + count + 3) // 4)
    return raw.astype("<u8", copy=False).view("<u2")[skip : skip + count]


DRAW_CHUNK = 1 << 20
"""Draws per step of `u16_keep`: its temporaries are 3 MB however large the mask, reused from the heap."""


def u16_keep(
    stream_seed: int, start: int, shape: torch.Size, threshold: int | torch.Tensor
) -> torch.Tensor:
    """Entries [start, start + numel) of a `pcg64dxsm_u16` keep-mask of `shape`: entry j is kept when draw j of
    `uniform_u16(stream_seed, ...)` is below its threshold (one for all entries, or a CPU tensor of one per
    entry). Drawn in steps of DRAW_CHUNK, so that a whole-tensor mask costs no whole-tensor temporaries."""
    keep = np.empty(math.prod(shape), dtype=bool)
    limits = threshold if isinstance(threshold, int) else threshold.reshape(-1).numpy()
    for a in range(0, keep.size, DRAW_CHUNK):
        b = min(a + DRAW_CHUNK, keep.size)
        limit = limits if isinstance(limits, int) else limits[a:b]
        np.less(uniform_u16(stream_seed, start + a, b - a), limit, out=keep[a:b])
    return torch.from_numpy(keep).reshape(shape)


def dare_masks(
    shape: torch.Size, runs: Sequence[Rows], density: float, ctx: MergeContext, model_index: int
) -> Iterator[torch.Tensor]:
    """Bernoulli(density) keep-masks of the runs of rows `runs` of expert `model_index`'s task vector (of
    `shape`), in order; joined, they are the whole tensor's mask, entry by entry in flat order.

    Drawn on the CPU, so that a recipe gives the same mask on every device, as its format says
    (`ctx.mask_draw`):
    - `torch_bernoulli` (format /1): torch's Bernoulli draws from `ctx.generator(model_index)`, run after run,
      straight into a boolean tensor from a broadcast probability: the draws of
      `torch.bernoulli(torch.full(shape, density))` without its two float32 tensors of the mask's shape.
    - `pcg64dxsm_u16` (format /2): entry j is kept when draw j of `uniform_u16(ctx.stream_seed(model_index))` is
      below round(density · 2^16); each run is drawn alone at its offset, about 10x faster (0.7–1 ns an
      entry against torch's 9–11). The keep rate is that threshold / 2^16, within 2^-17 of density: a density
      under 2^-17 keeps nothing, one over 1 − 2^-17 everything. DARE's rescale stays / density (mergekit's
      formula), so the expected rescaled entry is (keep rate / density) times the original, 1 within
      2^-17 / density.

    A mask depends on (draw, seed, tensor, model, density) only, which a search keeps fixed (PSO's basis is
    these masks), so a worker's memo keeps the whole mask packed eight entries to a byte: a 32nd of the
    bytes of a float32 task vector, and unpacking a run costs 0.05 ns an entry against 0.9 for drawing it.
    """
    whole = torch.empty(shape, device="meta")
    kind = f"dare_mask:{ctx.mask_draw}:{ctx.seed}:{density!r}"
    if not ctx.remembers(kind, (whole.numel() + 7) // 8, model_index):
        yield from drawn_masks(shape, runs, density, ctx, model_index)
        return

    def packed() -> torch.Tensor:
        keep = np.empty(whole.numel(), dtype=bool)
        for rows, mask in zip(runs, drawn_masks(shape, runs, density, ctx, model_index)):
            start = run_offset(whole, rows)
            keep[start : start + mask.numel()] = mask.reshape(-1).numpy()
        return torch.from_numpy(np.packbits(keep))

    bits = ctx.remember(kind, packed, model_index).numpy()
    for rows in runs:
        start, part = run_offset(whole, rows), whole[rows].shape
        count, skip = math.prod(part), start % 8
        unpacked = np.unpackbits(bits[start // 8 : (start + count + 7) // 8], count=skip + count)[skip:]
        yield torch.from_numpy(unpacked.view(bool)).reshape(part)


def drawn_masks(
    shape: torch.Size, runs: Sequence[Rows], density: float, ctx: MergeContext, model_index: int
) -> Iterator[torch.Tensor]:
    """`dare_masks` drawn, run by run."""
    whole = torch.empty(shape, device="meta")
    if ctx.mask_draw == "torch_bernoulli":
        generator = ctx.generator(model_index)
        keep = torch.tensor(density, dtype=torch.float32)
        for rows in runs:
            part = whole[rows].shape
            yield torch.empty(part, dtype=torch.bool).bernoulli_(keep.expand(part), generator=generator)
        return
    stream_seed, threshold = ctx.stream_seed(model_index), round(density * KEEP_STEPS)
    for rows in runs:
        yield u16_keep(stream_seed, run_offset(whole, rows), whole[rows].shape, threshold)


def dare_mask(shape: torch.Size, density: float, ctx: MergeContext, model_index: int) -> torch.Tensor:
    """The whole tensor's `dare_masks`."""
    return next(dare_masks(shape, [...], density, ctx, model_index))


def kept_entries(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x · mask (x where the boolean mask is true, else 0). On CPU through numpy: torch multiplies float32 by
    bool 4-5x slower (1.3 against 0.3 ns an entry, and more when its result is fresh pages); the same bits."""
    if x.device.type == "cpu" and x.dtype in NUMPY_SELECT:
        return torch.from_numpy(np.multiply(x.numpy(), mask.numpy()))
    return x * mask.to(x.device)


def dare_rescale(
    delta: torch.Tensor, mask: torch.Tensor, density: float, rescale: DareRescale
) -> torch.Tensor:
    """Apply a keep-mask and DARE's rescale (§2.5): ×1/(1−p), mergekit's L1 match, or nothing."""
    masked = kept_entries(delta, mask)
    if rescale == "inverse_p":
        return masked.div_(density)
    if rescale == "l1":
        return l1_rescale(delta, masked)
    return masked


def dare_task_vector(
    delta: torch.Tensor, density: float, rescale: DareRescale, ctx: MergeContext, model_index: int
) -> torch.Tensor:
    """DARE drop-and-rescale of expert `model_index`'s task vector; density ≥ 1 returns it unchanged with no
    RNG draw. A worker's memo keeps the mask (`dare_masks`), not the rescaled vector (32 times its bytes)."""
    if density >= 1.0:
        return delta
    return dare_rescale(delta, dare_mask(delta.shape, density, ctx, model_index), density, rescale)


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


def weighted_form(method: str, name: str, params: WeightedParams, n_experts: int) -> MergekitForm | str:
    """A task-vector operator as mergekit `method`, which reads the same parameters under mergekit's names:
    `lambda` and `normalize` shared, `rescale` shared where the operator has one, and per expert its weight
    and, where the operator has them, its density, `gamma` and `epsilon`."""
    rescale = getattr(params, "rescale", None)
    if rescale == "inverse_p":
        return f"{name}: rescale 'inverse_p' has no mergekit form (mergekit matches the L1 norm: use 'l1')"
    normalize = params.normalize  # type: ignore[attr-defined]  # every task-vector operator has one
    shared: dict[str, Any] = {"lambda": params.lambda_, "normalize": normalize}
    if rescale is not None:
        shared["rescale"] = rescale in (True, "l1")
    per_model: list[dict[str, Any]] = [{"weight": w} for w in params.weights]
    if hasattr(params, "density"):
        for entry, d in zip(per_model, per_expert(params.density, n_experts)):
            entry["density"] = d
    for extra in ("gamma", "epsilon"):
        if hasattr(params, extra):
            for entry in per_model:
                entry[extra] = getattr(params, extra)
    return MergekitForm(method, shared, per_model)


def weighted_method(name: str, normalize: bool, rescale: bool, density: bool = True) -> MergekitMethod:
    """A mergekit task-vector method: `lambda`, `normalize`, `rescale` and `int8_mask` shared (mergekit 0.1.5's
    defaults but `normalize` and `rescale`, which differ by method), a weight per model, and a density (1.0
    by default) where it trims."""
    shared = {"normalize": normalize, "lambda": 1.0, "rescale": rescale, "int8_mask": False}
    return MergekitMethod(name, shared, {"weight": None, **({"density": 1.0} if density else {})})


def weighted_params(read: MergekitRead) -> dict[str, Any]:
    """The inverse of `weighted_form`: weights, lambda, normalize, and the densities where mergekit has them
    (its `rescale` is each operator's to read: a boolean or a DARE rescale)."""
    params = {"weights": read.per_model["weight"], "lambda": read.shared["lambda"]}
    params["normalize"] = read.shared["normalize"]
    if "density" in read.per_model:
        params["density"] = read.per_model["density"]
    return params


def check_densities(params: OpParams, n_experts: int) -> None:
    """Shared `check` step for operators with a per-expert `density` setting."""
    check_per_expert("density", params.density, n_experts)  # type: ignore[attr-defined]
