"""Properties every operator must keep, on random tensors (hypothesis, few examples)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.operators.conftest import SAMPLE_PARAMS, MergeFn, randn, run_norm_average, run_op
from workers.operators import OPERATORS, MergeContext
from workers.operators.cabs import balanced_mask, cabs_masks, expert_order
from workers.operators.kernels import (
    EXACT_FLOAT_RANKS,
    count_nonzero_,
    dare_task_vector,
    top_k_count,
    top_k_mask,
)
from workers.operators.lore import lore_estimate
from workers.recipe import RecipeError

FEW = settings(max_examples=15, deadline=None)


@FEW
@given(
    seed=st.integers(0, 10_000), n=st.integers(1, 300), density=st.floats(0.01, 1.0), levels=st.integers(1, 6)
)
def test_top_k_keeps_exactly_k_and_breaks_ties_by_lower_index(
    seed: int, n: int, density: float, levels: int
) -> None:
    # Few distinct magnitudes force many exact ties.
    x = torch.randint(-levels, levels + 1, (n,), generator=torch.Generator().manual_seed(seed)).float()
    k = top_k_count(n, density)
    mask = top_k_mask(x, k)
    assert int(mask.sum()) == k
    reference = torch.sort(x.abs(), descending=True, stable=True).indices[:k]
    assert set(torch.nonzero(mask).reshape(-1).tolist()) == set(reference.tolist())


@pytest.mark.parametrize("n", [1, 1000, EXACT_FLOAT_RANKS + 3])  # the last one sums in float64
def test_count_nonzero_matches_torch(n: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    x[::3] = 0.0
    x[1::7] = -0.0
    assert count_nonzero_(x.clone()) == int(torch.count_nonzero(x))


@FEW
@given(seed=st.integers(0, 10_000), k_experts=st.integers(1, 4), density=st.floats(0.05, 1.0))
def test_ties_output_is_supported_on_the_trimmed_entries(seed: int, k_experts: int, density: float) -> None:
    base = randn(seed, 7, 9)
    experts = [base + randn(seed + i + 1, 7, 9) for i in range(k_experts)]
    out = run_op("ties", {"weights": [1.0] * k_experts, "density": density}, base, experts)
    kept = torch.zeros_like(base, dtype=torch.bool)
    for x in experts:
        mask = top_k_mask(x - base, top_k_count(base.numel(), density))
        assert int(mask.sum()) == top_k_count(base.numel(), density)
        kept |= mask
    assert torch.all((out - base)[~kept] == 0)
    # The disjoint mean never leaves the range of the agreeing entries.
    deltas = torch.stack([x - base for x in experts])
    assert torch.all((out - base).abs() <= deltas.abs().amax(0) + 1e-6)


@FEW
@given(
    seed=st.integers(0, 10_000), n=st.integers(1, 4), m=st.sampled_from([4, 8, 16]), numel=st.integers(1, 90)
)
def test_cabs_masks_never_overlap_and_full_blocks_keep_n(seed: int, n: int, m: int, numel: int) -> None:
    k_experts = max(1, min(3, m // n))  # Σ n ≤ m: every expert finds free slots in every block
    taus = [randn(seed + i, numel) for i in range(k_experts)]
    occupied = torch.zeros(numel, dtype=torch.bool)
    for tau in taus:
        mask = balanced_mask(tau, occupied, n, m)
        full = numel // m * m
        tail = numel - full
        tail_keep = int(tail * n / m + 0.5)
        if full:
            assert torch.all(mask[:full].view(-1, m).sum(1) == n)
            assert not torch.any(mask[:full] & occupied[:full])
        assert int(mask[full:].sum()) == tail_keep
        if int(occupied[full:].sum()) + tail_keep <= tail:  # a short tail may have to overfill
            assert not torch.any(mask[full:] & occupied[full:])
        occupied |= mask


def test_cabs_overfill_takes_free_slots_then_its_own_largest_occupied() -> None:
    occupied = torch.tensor([True, True, True, False])
    tau = torch.tensor([0.1, 0.9, 0.5, 0.01])
    mask = balanced_mask(tau, occupied, 2, 4)
    assert mask.tolist() == [False, True, False, True]


@FEW
@given(
    seed=st.integers(0, 10_000),
    m=st.sampled_from([4, 8, 16]),
    blocks=st.integers(1, 5),
    k_experts=st.integers(2, 4),
    by_score=st.booleans(),
)
def test_cabs_alg2_masks_keep_n_per_block_and_overlap_only_when_sum_n_exceeds_m(
    seed: int, m: int, blocks: int, k_experts: int, by_score: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    ns = torch.randint(1, m + 1, (k_experts,), generator=gen).tolist()
    taus = [randn(seed + i, blocks, m) for i in range(k_experts)]
    order = "by_score" if by_score else torch.randperm(k_experts, generator=gen).tolist()
    masks = dict(cabs_masks(taus, ns, m, order))
    for i, mask in masks.items():
        assert torch.all(mask.sum(1) == ns[i])  # every block of m keeps exactly n_i, overfilled or not
    overlap = torch.stack(list(masks.values())).sum(0)  # how many experts took each slot
    if sum(ns) <= m:
        assert torch.all(overlap <= 1)
    else:  # Alg. 2 overfills only as much as it must: a block's slots are all taken before any twice
        assert torch.all(overlap.gt(0).sum(1) == m)


@FEW
@given(seed=st.integers(0, 10_000), m=st.sampled_from([4, 5, 8, 9, 16]), blocks=st.integers(1, 4))
def test_cabs_reference_overfill_keeps_m_minus_n_plus_half_m_per_block(
    seed: int, m: int, blocks: int
) -> None:
    taus = [randn(seed, blocks, m), randn(seed + 1, blocks, m)]
    for n in range(1, m + 1):
        (_, first), (_, second) = cabs_masks(taus, [n, n], m, overfill="reference")
        assert torch.all(first.sum(1) == n)
        if n >= m // 2:  # the 7B script's test, integer division included
            assert torch.all(second.sum(1) == (m - n) + m // 2)
            assert torch.all(second | first)  # every slot the first left free
            top = torch.where(first, taus[1].abs(), -1.0).topk(m // 2, dim=1).indices
            assert torch.all((second & first).sum(1) == m // 2) and torch.all(second.gather(1, top))
        else:  # at least n free slots: no overfill, the same masks as Alg. 2
            _, alg2 = list(cabs_masks(taus, [n, n], m))[1]
            assert torch.equal(second, alg2)


@FEW
@given(seed=st.integers(0, 10_000), k_experts=st.integers(1, 5))
def test_cabs_by_score_is_the_order_of_total_magnitude(seed: int, k_experts: int) -> None:
    base = randn(seed, 6, 8)
    scale = torch.rand(k_experts, generator=torch.Generator().manual_seed(seed)).tolist()
    experts = [base + s * randn(seed + 1 + i, 6, 8) for i, s in enumerate(scale)]
    if k_experts > 2:
        experts[2] = base + (base - experts[0])  # the same total as expert 0: the lower index goes first
    totals = [float((x - base).abs().sum(dtype=torch.float64)) for x in experts]
    by_hand = sorted(range(k_experts), key=lambda i: (-totals[i], i))
    assert expert_order("by_score", [x - base for x in experts]) == by_hand
    params = {"weights": [1.0] * k_experts, "n": 2, "m": 8}
    torch.testing.assert_close(
        run_op("cabs", {**params, "order": "by_score"}, base, experts),
        run_op("cabs", {**params, "order": by_hand}, base, experts),
    )


@FEW
@given(seed=st.integers(0, 10_000), k_experts=st.integers(1, 4))
def test_norms_average_is_the_weighted_mean_within_the_experts_range(seed: int, k_experts: int) -> None:
    base = 1 + 0.1 * randn(seed, 16)
    experts = [base + 0.05 * randn(seed + 1 + i, 16) for i in range(k_experts)]
    weights = (0.1 + torch.rand(k_experts, generator=torch.Generator().manual_seed(seed))).tolist()
    mean = sum(w * x for w, x in zip(weights, experts)) / sum(weights)
    stack = torch.stack(experts)
    for op in ("linear", "task_arithmetic", "ties", "dare", "dare_ties", "cabs", "breadcrumbs", "della"):
        params = {"weights": weights, "lambda": 3.0} if op != "linear" else {"weights": weights}
        if op == "cabs":
            params |= {"n": 1, "m": 4}
        out = run_norm_average(op, params, base, experts)
        torch.testing.assert_close(out, mean, msg=op)  # no sparsification, no rescale, no λ
        assert torch.all(out >= stack.amin(0) - 1e-6) and torch.all(out <= stack.amax(0) + 1e-6)
    for op, params in (("ram", {}), ("ram_plus", {}), ("lore", {"post": "ties"})):
        torch.testing.assert_close(run_norm_average(op, params, base, experts), stack.mean(0), msg=op)


def test_norms_average_keeps_copy_and_slerp() -> None:
    assert run_norm_average("copy", SAMPLE_PARAMS["copy"], torch.zeros(4), [torch.ones(4)] * 2) is None
    assert run_norm_average("slerp", SAMPLE_PARAMS["slerp"], torch.zeros(4), [torch.ones(4)] * 2) is None


def test_cabs_with_one_expert_is_balanced_sparsification(merge: MergeFn) -> None:
    tau = randn(3, 4, 16)
    out = merge("cabs", {"weights": [1.0], "n": 4, "m": 16}, torch.zeros(4, 16), [tau])
    expected = torch.zeros_like(tau)
    for row in range(4):
        top = tau[row].abs().topk(4).indices
        expected[row, top] = tau[row, top]
    torch.testing.assert_close(out, expected)


@FEW
@given(seed=st.integers(0, 10_000), rank=st.sampled_from([0.2, 0.5, 1.0]), k_experts=st.integers(2, 4))
def test_lore_deltas_have_at_most_the_target_rank(seed: int, rank: float, k_experts: int) -> None:
    thetas = [randn(seed + i, 10, 6) for i in range(k_experts)]
    _, deltas, _ = lore_estimate(thetas, mu=None, rank_fraction=rank, max_iter=5, tol=1e-4)
    target = int(rank * 6)
    for d in deltas:
        assert int(torch.linalg.matrix_rank(d, atol=1e-4)) <= target


def test_lore_with_one_expert_returns_it_and_averages_vectors(merge: MergeFn) -> None:
    x = randn(1, 8, 5)
    torch.testing.assert_close(merge("lore", {}, torch.zeros(8, 5), [x]), x)
    a, b, c = randn(2, 5), randn(3, 5), randn(4, 5)
    torch.testing.assert_close(merge("lore", {}, torch.zeros(5), [a, b, c]), (a + b + c) / 3)


def test_lore_with_two_experts_degenerates_to_the_average(merge: MergeFn) -> None:
    a, b = randn(4, 8, 6), randn(5, 8, 6)
    with pytest.warns(UserWarning, match="plain average"):
        out = merge("lore", {"rank": 0.5}, torch.zeros(8, 6), [a, b])
    torch.testing.assert_close(out, (a + b) / 2, atol=1e-5, rtol=0)


def dare_ctx(seed: int) -> MergeContext:
    return MergeContext("model.layers.3.mlp.down_proj.weight", ("a",), "base", seed)


@FEW
@given(seed=st.integers(0, 2**40), density=st.floats(0.05, 0.95))
def test_dare_is_reproducible_from_its_seed(seed: int, density: float) -> None:
    delta = randn(0, 40, 10)
    first = dare_task_vector(delta, density, "inverse_p", dare_ctx(seed), 0)
    torch.testing.assert_close(first, dare_task_vector(delta, density, "inverse_p", dare_ctx(seed), 0))
    assert not torch.equal(first, dare_task_vector(delta, density, "inverse_p", dare_ctx(seed + 1), 0))
    assert not torch.equal(first, dare_task_vector(delta, density, "inverse_p", dare_ctx(seed), 1))


def test_dare_inverse_p_is_unbiased_and_keeps_about_density() -> None:
    delta = torch.ones(200_000)
    out = dare_task_vector(delta, 0.3, "inverse_p", dare_ctx(7), 0)
    kept = float((out != 0).float().mean())
    assert abs(kept - 0.3) < 0.005
    assert abs(float(out.mean()) - 1.0) < 0.02  # E[m/(1−p)] = 1
    l1 = dare_task_vector(delta, 0.3, "l1", dare_ctx(7), 0)
    assert abs(float(l1.abs().sum()) - 200_000) < 1e-1  # mergekit matches the L1 norm exactly


def test_dare_affine_sparse_basis_is_the_dare_operator(merge: MergeFn) -> None:
    base, a, b = randn(1, 6, 8), randn(2, 6, 8), randn(3, 6, 8)
    affine = merge(
        "dare_affine", {"dense": [0.0, 0.0], "sparse": [1.0, 0.0], "density": 0.4}, base, [a, b], seed=9
    )
    plain = merge("dare", {"weights": [1.0, 0.0], "density": 0.4}, base, [a, b], seed=9)
    torch.testing.assert_close(affine, plain)
    dense = merge("dare_affine", {"dense": [0.0, 1.0], "sparse": [0.0, 0.0]}, base, [a, b])
    torch.testing.assert_close(dense, b)


@FEW
@given(seed=st.integers(0, 10_000))
def test_ram_variants_differ_only_on_unique_entries(seed: int) -> None:
    base = torch.zeros(200)
    deltas = [torch.where(randn(seed + 10 + i, 200) > 0.3, randn(seed + i, 200), 0.0) for i in range(3)]
    plain = run_op("ram", {}, base, deltas)
    plus = run_op("ram_plus", {"r": 0.5, "alpha": 10.0}, base, deltas)
    paper = run_op(
        "ram", {"variant": "paper70b", "percentile": None, "shared_divisor": "count"}, base, deltas
    )
    count = torch.stack([d.abs() > 1e-5 for d in deltas]).sum(0)
    torch.testing.assert_close(plus[count != 1], plain[count != 1])
    torch.testing.assert_close(paper[count != 1], plain[count != 1])
    torch.testing.assert_close(paper[count == 1], 1.5 * plain[count == 1])
    assert torch.all(plus[count == 1].abs() >= plain[count == 1].abs())


@FEW
@given(seed=st.integers(0, 10_000))
def test_slerp_endpoints(seed: int) -> None:
    base, other = randn(seed, 5, 7), randn(seed + 1, 5, 7)
    torch.testing.assert_close(run_op("slerp", {"t": 0.0}, base, [other]), base)
    torch.testing.assert_close(run_op("slerp", {"t": 1.0}, base, [other]), other, atol=1e-5, rtol=1e-5)
    colinear = run_op("slerp", {"t": 0.25}, base, [2 * base])
    torch.testing.assert_close(colinear, 1.25 * base)  # |cos Ω| > 0.9995: lerp


def test_magnitude_prune_merged_scope_hits_the_target_density(merge: MergeFn) -> None:
    base, a, b = randn(1, 20, 10), randn(2, 20, 10), randn(3, 20, 10)
    out = merge("magnitude_prune", {"weights": [0.5, 0.5], "density": 0.3, "scope": "merged"}, base, [a, b])
    assert int(((out - base) != 0).sum()) == 60
    each = merge("magnitude_prune", {"weights": [1.0, 1.0], "density": [0.1, 1.0]}, base, [a, b])
    torch.testing.assert_close(each, base + (b - base) + top_k_mask(a - base, 20) * (a - base))


def test_single_expert_rules(merge: MergeFn) -> None:
    base, x = randn(1, 6, 4), randn(2, 6, 4)
    torch.testing.assert_close(merge("linear", {"weights": [0.3]}, base, [x]), x)
    torch.testing.assert_close(merge("task_arithmetic", {"weights": [0.5], "lambda": 2.0}, base, [x]), x)
    ties = merge("ties", {"weights": [1.0], "density": 0.25}, base, [x])
    pruned = merge("magnitude_prune", {"weights": [1.0], "density": 0.25}, base, [x])
    torch.testing.assert_close(ties, pruned)


@pytest.mark.parametrize("op", sorted(OPERATORS))
def test_inputs_are_not_modified_and_shape_is_kept(op: str) -> None:
    base, a, b = randn(1, 12, 8), randn(2, 12, 8), randn(3, 12, 8)
    copies = [base.clone(), a.clone(), b.clone()]
    out = run_op(op, SAMPLE_PARAMS[op], base, [a, b])
    assert out.shape == base.shape and out.dtype == torch.float32
    for before, after in zip(copies, [base, a, b]):
        assert torch.equal(before, after)


@pytest.mark.parametrize(
    ("op", "params", "message"),
    [
        ("ties", {"weights": [1, 1], "density": 0.0}, "op 'ties' parameter 'density"),
        ("ties", {"weights": [1, 1], "density": [0.5]}, "op 'ties': density has 1 entries for 2 experts"),
        ("ties", {"weights": [1, 1], "densty": 0.5}, "op 'ties' parameter 'densty'"),
        ("dare", {"weights": [1], "rescale": "l2"}, "op 'dare' parameter 'rescale'"),
        ("cabs", {"weights": [1, 1], "n": 9, "m": 8}, "op 'cabs': n = 9 exceeds m = 8"),
        ("cabs", {"weights": [1, 1], "m": 0}, "op 'cabs' parameter 'm'"),
        ("cabs", {"weights": [1, 1], "order": [0, 0]}, "op 'cabs': order [0, 0]"),
        ("cabs", {"weights": [1, 1], "order": "by_norm"}, "op 'cabs' parameter 'order': .*'by_score'"),
        ("cabs", {"weights": [1, 1], "overfill": "script"}, "op 'cabs' parameter 'overfill'"),
        ("dare_affine", {"dense": [1, 1], "sparse": [1]}, "op 'dare_affine': sparse has 1 entries"),
        ("lore", {"mode": "mu"}, "mode 'mu' needs a value for mu"),
        ("slerp", {"t": 0.5}, "op 'slerp': slerp joins exactly 2 models"),
        ("magnitude_prune", {"weights": [1, 1], "density": [0.2, 0.3], "scope": "merged"}, "one number"),
    ],
)
def test_bad_parameters_name_the_op_and_parameter(op: str, params: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_op(
            op,
            params,
            torch.zeros(4),
            [torch.zeros(4), torch.zeros(4)] if op != "dare" else [torch.zeros(4)] * 2,
        )


@FEW
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 400),
    density=st.floats(0.05, 0.99),
    gamma=st.floats(0.0, 0.2),
)
def test_breadcrumbs_keeps_int_dn_below_the_outliers(seed: int, n: int, density: float, gamma: float) -> None:
    delta = randn(seed, n)
    out = run_op(
        "breadcrumbs", {"weights": [1.0], "density": density, "gamma": gamma}, torch.zeros(n), [delta]
    )
    keep = top_k_count(n, density)
    outliers = min(int(gamma * n), n - keep)
    assert int((out != 0).sum()) == keep
    ranked = torch.sort(delta.abs(), descending=True).indices
    assert torch.all(out[ranked[:outliers]] == 0)
    torch.testing.assert_close(
        out[ranked[outliers : outliers + keep]], delta[ranked[outliers : outliers + keep]]
    )


def test_della_keeps_large_entries_more_often_and_is_seeded(merge: MergeFn) -> None:
    delta = torch.arange(1, 20_001, dtype=torch.float32).reshape(2, 10_000)
    params = {"weights": [1.0], "density": 0.5, "epsilon": 0.3, "rescale": "none"}
    out = merge("della", params, torch.zeros(2, 10_000), [delta], seed=4)
    kept = (out != 0).float()
    assert abs(float(kept.mean()) - 0.5) < 0.02
    assert float(kept[:, :2000].mean()) < 0.3 and float(kept[:, -2000:].mean()) > 0.7  # p from 0.2 up to 0.8
    torch.testing.assert_close(out, merge("della", params, torch.zeros(2, 10_000), [delta], seed=4))
    with pytest.raises(RecipeError, match=r"op 'della': density 0.9 ± epsilon 0.15 must lie in \(0, 1\)"):
        merge("della", {"weights": [1.0], "density": 0.9}, torch.zeros(3), [torch.ones(3)])
