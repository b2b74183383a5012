"""Every hand-worked example of ALGORITHMS.md §1.4–§2.9, checked exactly."""

from __future__ import annotations

import math

import torch

from tests.operators.conftest import MergeFn, run_norm_average, t
from workers.operators.kernels import dare_rescale, top_k_count
from workers.operators.lore import lore_estimate
from workers.operators.ram import percentile

ZERO6 = torch.zeros(6)


def test_top_k_count_follows_mergekit_float64_rule() -> None:
    assert top_k_count(100, 0.29) == 28  # int(0.29·100) = 28, not 29
    assert top_k_count(10, 0.01) == 1  # d > 0 but int(d·n) = 0 → 1
    assert top_k_count(10, 1.0) == 10


def test_ties_table(merge: MergeFn) -> None:
    d1 = t([0.5, -0.2, 0.1, 0, -0.6, 0.3])
    d2 = t([-0.4, -0.3, 0.2, 0.1, 0.05, -0.1])
    d3 = t([0.1, 0.4, -0.05, -0.2, -0.3, 0.2])
    out = merge("ties", {"weights": [1, 1, 1], "density": 0.5, "lambda": 1.0}, ZERO6, [d1, d2, d3])
    torch.testing.assert_close(out, t([0.5, 0.4, 0.2, -0.2, -0.45, 0.3]))


def test_ties_tie_goes_to_lower_index_even_with_a_base(merge: MergeFn) -> None:
    base = t([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    d3 = t([0.1, 0.4, -0.05, -0.2, -0.3, 0.2])
    out = merge("ties", {"weights": [1], "density": 0.5}, base, [base + d3])
    # K = 1: TIES is the magnitude trim; the |0.2| tie between e3 and e5 keeps e3.
    torch.testing.assert_close(out - base, t([0, 0.4, 0, -0.2, -0.3, 0]))


def test_dare_example_paper_and_mergekit_rescale() -> None:
    delta = t([0.4, -0.2, 0.1, 0.3])
    mask = torch.tensor([True, False, False, True])
    torch.testing.assert_close(dare_rescale(delta, mask, 0.5, "inverse_p"), t([0.8, 0, 0, 0.6]))
    torch.testing.assert_close(dare_rescale(delta, mask, 0.5, "l1"), t([0.4 / 0.7, 0, 0, 0.3 / 0.7]))
    torch.testing.assert_close(dare_rescale(delta, mask, 0.5, "none"), t([0.4, 0, 0, 0.3]))


def test_cabs_example(merge: MergeFn) -> None:
    tau_a = t([0.9, -0.1, 0.3, 0.05, -0.2, 0.6, 0, 0.4])
    tau_b = t([0.8, 0.2, -0.7, 0.1, 0.3, -0.5, 0.05, 0])
    params = {"weights": [1, 1], "n": 1, "m": 4, "order": [0, 1]}
    out = merge("cabs", params, torch.zeros(8), [tau_a, tau_b])
    torch.testing.assert_close(out, t([0.9, 0, -0.7, 0, 0.3, 0.6, 0, 0]))
    # Independent BS on τ_B would have collided with A at e0 and e5; B first changes the result.
    out_b_first = merge("cabs", {**params, "order": [1, 0]}, torch.zeros(8), [tau_a, tau_b])
    torch.testing.assert_close(out_b_first, t([0.8, 0, 0.3, 0, 0, -0.5, 0, 0.4]))


def test_cabs_by_score_example(merge: MergeFn) -> None:
    # Σ|τ_A| = 2.55 < Σ|τ_B| = 2.65: by_score masks B first, as order [1, 0] does.
    tau_a = t([0.9, -0.1, 0.3, 0.05, -0.2, 0.6, 0, 0.4])
    tau_b = t([0.8, 0.2, -0.7, 0.1, 0.3, -0.5, 0.05, 0])
    out = merge(
        "cabs", {"weights": [1, 1], "n": 1, "m": 4, "order": "by_score"}, torch.zeros(8), [tau_a, tau_b]
    )
    torch.testing.assert_close(out, t([0.8, 0, 0.3, 0, 0, -0.5, 0, 0.4]))


def test_cabs_overfill_example(merge: MergeFn) -> None:
    # One block of 4, A first. τ_A keeps e0, e2 at 2:4 and also e1 at 3:4.
    tau_a = t([0.9, -0.1, 0.3, 0.05])
    tau_b = t([0.8, 0.2, -0.7, 0.1])

    def cabs(n: int, overfill: str) -> torch.Tensor:
        params = {"weights": [1, 1], "n": n, "m": 4, "overfill": overfill}
        return merge("cabs", params, torch.zeros(4), [tau_a, tau_b])

    # 2:4 — Alg. 2: B finds its 2 slots free (e1, e3). Reference: (1 − mask_A) ∪ BS(τ_B ⊙ mask_A, 2) is the
    # whole block: B lands on e0 and e2 as well.
    torch.testing.assert_close(cabs(2, "alg2"), t([0.9, 0.2, 0.3, 0.1]))
    torch.testing.assert_close(cabs(2, "reference"), t([1.7, 0.2, -0.4, 0.1]))
    # 3:4 — one free slot (e3); Alg. 2 adds B's top 2 occupied (e0, e2), the reference rule its top m/2 = 2
    # occupied: (m − n) + m/2 = n, the same mask.
    torch.testing.assert_close(cabs(3, "alg2"), t([1.7, -0.1, -0.4, 0.1]))
    torch.testing.assert_close(cabs(3, "reference"), t([1.7, -0.1, -0.4, 0.1]))
    # 1:4 — n < m/2: nothing overfills, both rules give §2.6's first block.
    torch.testing.assert_close(cabs(1, "reference"), cabs(1, "alg2"))
    torch.testing.assert_close(cabs(1, "alg2"), t([0.9, 0, -0.7, 0]))


def test_norms_average_example() -> None:
    # A layer norm under ties (density 0.5, λ = 2) and dare_affine, with norms: average.
    base, e0, e1 = t([1.0, 1.0]), t([1.2, 0.8]), t([0.8, 1.6])
    ties = run_norm_average("ties", {"weights": [3, 1], "density": 0.5, "lambda": 2.0}, base, [e0, e1])
    torch.testing.assert_close(ties, t([1.1, 1.0]))  # (3·θ_0 + 1·θ_1) / 4: nothing trimmed, no λ
    affine = run_norm_average("dare_affine", {"dense": [0.5, 0.1], "sparse": [0.2, 0.3]}, base, [e0, e1])
    torch.testing.assert_close(affine, t([1.06, 1.1]))  # θ_b + 0.7·δ_0 + 0.4·δ_1: DARE particles undropped


def test_lore_three_models_two_by_two() -> None:
    thetas = [
        torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64),
        torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64),
        torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64),
    ]
    theta0_first = torch.stack(thetas).mean(0)
    torch.testing.assert_close(theta0_first, torch.tensor([[1, 1 / 3], [0, 1 / 3]], dtype=torch.float64))
    sv = [torch.linalg.svdvals(x - theta0_first) for x in thetas]
    expected_sv = [(1.0599, 0.3145), (1.0855, 0.6141), (0.7454, 0.0)]
    for got, want in zip(sv, expected_sv):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=0)

    theta0, deltas, rounds = lore_estimate(thetas, mu=0.5, rank_fraction=0.2, max_iter=1000, tol=1e-10)
    assert abs(rounds - 43) <= 1
    torch.testing.assert_close(
        theta0, torch.tensor([[0.9572, 0.6210], [-0.1297, 0.2757]], dtype=torch.float64), atol=1e-4, rtol=0
    )
    assert float(deltas[2].abs().max()) == 0.0
    direct = theta0 + sum(deltas)
    torch.testing.assert_close(
        direct, torch.tensor([[1.0855, -0.2421], [0.2593, 0.4485]], dtype=torch.float64), atol=1e-4, rtol=0
    )
    average = theta0 + sum(deltas) / 3
    torch.testing.assert_close(average, torch.stack(thetas).mean(0), atol=1e-8, rtol=0)


def test_lore_operator_matches_the_example_in_float32(merge: MergeFn) -> None:
    thetas = [t([[2, 0], [0, 0]]), t([[0, 0], [0, 1]]), t([[1, 1], [0, 0]])]
    params = {"mode": "mu", "mu": 0.5, "max_iter": 200, "tol": 1e-7}
    out = merge("lore", params, torch.zeros(2, 2), thetas)
    torch.testing.assert_close(out, t([[1.0855, -0.2421], [0.2593, 0.4485]]), atol=1e-3, rtol=0)


RAM_D1 = t([0.5, 0, 0.2, 0, -0.3, 1e-6])
RAM_D2 = t([0.4, 0.6, 0, 0, 0.1, 0])


def test_ram_example(merge: MergeFn) -> None:
    out = merge("ram", {}, ZERO6, [RAM_D1, RAM_D2])
    torch.testing.assert_close(out, t([0.45, 0.6, 0.2, 0, -0.1, 0]))


def test_ram_plus_example(merge: MergeFn) -> None:
    out = merge("ram_plus", {}, ZERO6, [RAM_D1, RAM_D2])
    torch.testing.assert_close(out, t([0.45, 0.612, 0.204, 0, -0.1, 0]))


def test_ram_paper70b_example_with_the_same_masks(merge: MergeFn) -> None:
    out = merge("ram", {"variant": "paper70b", "percentile": None}, ZERO6, [RAM_D1, RAM_D2])
    torch.testing.assert_close(out, t([0.45, 0.9, 0.3, 0, -0.1, 0]))


def test_ram_paper70b_percentile_rule_ignores_a_mostly_zero_tensor(merge: MergeFn) -> None:
    d = torch.zeros(20)
    d[7] = 0.5  # 95% exact zeros: the 90th percentile is 0, so "≥ τ" alone would mark every entry active
    assert float(percentile(d.abs(), 90.0)) == 0.0
    out = merge("ram", {"variant": "paper70b"}, torch.zeros(20), [d])
    torch.testing.assert_close(out, 1.5 * d)  # K = 1: every active entry is unique, scaled by λ = 1.5


def test_percentile_interpolates_linearly_like_numpy() -> None:
    x = t([0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5])
    assert float(percentile(x, 90.0)) == torch.tensor(0.05).item()  # position 8.1 between 0 and 0.5


def test_slerp_example(merge: MergeFn) -> None:
    out = merge("slerp", {"t": 0.5}, t([1, 0]), [t([0, 1])])
    torch.testing.assert_close(out, t([math.sqrt(0.5), math.sqrt(0.5)]))


def test_slerp_zero_vector_parity_and_lerp(merge: MergeFn) -> None:
    parity = merge("slerp", {"t": 0.5}, t([0, 0]), [t([1, 1])])
    torch.testing.assert_close(parity, t([math.sqrt(0.5), math.sqrt(0.5)]))  # sin(tπ/2)·v1
    lerp = merge("slerp", {"t": 0.5, "zero": "lerp"}, t([0, 0]), [t([1, 1])])
    torch.testing.assert_close(lerp, t([0.5, 0.5]))


def test_pso_one_dimensional_example_is_an_affine_combination(merge: MergeFn) -> None:
    # §5: x = 0.5, v = 0, pbest = 0.7, gbest = 1.0, r1 = 0.5, r2 = 0.25 → x = 0.95 (c1 = c2 = 2, w = 0.2).
    x = 0.5 + 0.2 * 0 + 2 * 0.5 * (0.7 - 0.5) + 2 * 0.25 * (1.0 - 0.5)
    base, expert = t([1.0, 2.0]), t([3.0, 6.0])
    out = merge("dare_affine", {"dense": [x], "sparse": [0.0]}, base, [expert])
    torch.testing.assert_close(out, base + 0.95 * (expert - base))
