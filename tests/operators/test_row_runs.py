"""A one-off merge trims large tensors in runs of rows with each expert's whole-tensor threshold: the results
must be the bits a worker (memo, one run) computes, ties at the density cut included."""

from __future__ import annotations

import pytest
import torch

from workers.operators import MergeContext, kernels, resolve
from workers.operators.base import SourceMemo
from workers.operators.kernels import TopK, kth_smallest, top_k_mask
from workers.recipe import MaskDraw, OpSpec


def sparse_tensor(gen: torch.Generator, shape: tuple[int, ...], nonzero: float) -> torch.Tensor:
    """Gaussian entries on a random `nonzero` fraction, exact zeros elsewhere, plus repeated magnitudes."""
    x = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < nonzero)
    x.view(-1)[::7] = 0.25  # many ties at one magnitude, with both signs
    x.view(-1)[3::11] = -0.25
    return x


@pytest.mark.parametrize("nonzero", [0.6, 0.05])  # 0.05: mostly zeros, the k-th value among the nonzeros
@pytest.mark.parametrize("k", [0, 1, 37, 300, 555, 1000, 1200])
def test_top_k_rule_in_runs_is_the_whole_tensor_mask(k: int, nonzero: float) -> None:
    x = sparse_tensor(torch.Generator().manual_seed(k), (40, 30), nonzero=nonzero)
    if nonzero < 0.5:
        x.view(-1)[::7] = x.view(-1)[3::11] = 0.0  # no repeated magnitudes: under half the entries nonzero
        assert int((x != 0).sum()) * 2 < x.numel()
    whole = top_k_mask(x, k)
    rule = TopK.of(x, k)
    runs = torch.cat([rule.mask(x[r : r + 7], r * 30) for r in range(0, 40, 7)])
    assert torch.equal(runs, whole)
    assert int(whole.sum()) == min(k, x.numel())
    if 0 < k < x.numel():  # ties at the cut go to the lower flat index
        order = torch.sort(x.abs().reshape(-1), descending=True, stable=True).indices[:k]
        expected = torch.zeros(x.numel(), dtype=torch.bool)
        expected[order] = True
        assert torch.equal(whole.reshape(-1), expected)


def test_numpy_k_th_value_matches_torch() -> None:
    x = torch.randn(5001, generator=torch.Generator().manual_seed(3))
    for q in (1, 17, 2500, 5001):
        assert float(kth_smallest(x, q)) == float(torch.kthvalue(x, q).values)


@pytest.mark.parametrize(
    ("op", "params"),
    [
        ("ties", {"weights": [0.5, 0.3, 0.9], "density": [0.3, 0.05, 0.8]}),
        ("ties", {"weights": [0.5, -0.3, 0.9], "density": 0.5, "normalize": False, "lambda": 1.3}),
        ("magnitude_prune", {"weights": [0.5, 0.3, 0.9], "density": 0.45}),
        ("magnitude_prune", {"weights": [0.5, 0.3, 0.9], "density": 0.45, "scope": "merged", "lambda": 0.7}),
    ],
)
def test_merges_in_runs_equal_the_whole_tensor_merge(
    op: str, params: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One-off and worker merges (memo with ranks, memo with task vectors only) in runs of rows give the bits
    of the whole-tensor merge."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(64, 48, generator=gen)
    experts = [base + sparse_tensor(gen, (64, 48), nonzero=0.3) for _ in range(3)]
    names = ("e0", "e1", "e2")
    operator, parsed = resolve(OpSpec(op=op, params=params), 3, ("base", *names))
    assert len(kernels.row_runs(base)) == 1
    whole = operator.merge(base, experts, parsed, MergeContext("t", names, "base", 0))
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 48 * 4 * 5)  # runs of 5 rows, the last one shorter
    assert len(kernels.row_runs(base)) == 13
    assert torch.equal(operator.merge(base, experts, parsed, MergeContext("t", names, "base", 0)), whole)
    for budget in (1 << 30, 3 * base.nbytes):  # ranks kept; task vectors only
        memo = SourceMemo(budget)
        for _ in range(2):  # the memo's first candidate fills it, the second reads it
            worker = operator.merge(base, experts, parsed, MergeContext("t", names, "base", 0, memo))
            assert torch.equal(worker, whole)
        kept = 3 * base.nbytes if params.get("scope") == "merged" else 6 * base.nbytes  # task vectors, ranks
        assert memo.bytes == min(budget, kept)


@pytest.mark.parametrize("op", ["ties", "magnitude_prune"])
def test_a_0_d_tensor_merges_as_one_run(op: str) -> None:
    """Real checkpoints hold 0-d tensors (GPT-NeoX's `attention.masked_bias`); a trim over them is one run."""
    base, experts = torch.tensor(1.0), [torch.tensor(2.0), torch.tensor(0.5)]
    operator, parsed = resolve(OpSpec(op=op, params={"weights": [1.0, 1.0], "density": 1.0}), 2, ("base", "a", "b"))
    merged = operator.merge(base, experts, parsed, MergeContext("t", ("a", "b"), "base", 0))
    assert merged.shape == () and torch.isfinite(merged)
    assert merged.item() != base.item()


@pytest.mark.parametrize("density", [0.2, 0.9, 0.5])
@pytest.mark.parametrize("shape", [(70, 33), (5,), ()])
def test_dare_mask_draws_the_bits_recipes_have_always_had(shape: tuple[int, ...], density: float) -> None:
    """The mask is drawn without whole-shape float tensors, but must stay what a format /1 recipe's seed has
    meant: `torch.bernoulli(torch.full(shape, density))` from the (seed, tensor, model) generator."""
    ctx = MergeContext("t", ("a", "b"), "base", 7, mask_draw="torch_bernoulli")
    mask = kernels.dare_mask(torch.Size(shape), density, ctx, 1)
    before = torch.bernoulli(torch.full(shape, density, dtype=torch.float32), generator=ctx.generator(1))
    assert mask.dtype == torch.bool
    assert torch.equal(mask, before.bool())
    assert torch.equal(mask, kernels.dare_mask(torch.Size(shape), density, ctx, 1))
    assert shape != (70, 33) or not torch.equal(mask, kernels.dare_mask(torch.Size(shape), density, ctx, 0))


@pytest.mark.parametrize("mask_draw", ["torch_bernoulli", "pcg64dxsm_u16"])
@pytest.mark.parametrize("rescale", ["inverse_p", "none", "l1"])
def test_dare_affine_in_runs_equals_the_whole_tensor_merge(
    rescale: str, mask_draw: MaskDraw, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dare_affine by runs of rows (each expert's masks drawn run by run: from one generator in /1, at the run's
    offset in /2) gives the bits of the whole-tensor merge, one-off and in a worker whose memo keeps everything,
    task vectors only, or nothing."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(64, 47, generator=gen)  # rows of 47: most runs start at an offset not a multiple of 4
    experts = [base + sparse_tensor(gen, (64, 47), nonzero=0.3) for _ in range(3)]
    names = ("e0", "e1", "e2")
    spec = {"dense": [0.3, -0.2, 0.5], "sparse": [0.7, 0.0, 0.4], "density": 0.3, "rescale": rescale}
    operator, parsed = resolve(OpSpec(op="dare_affine", params=spec), 3, ("base", *names))

    def merge(seed: int, memo: SourceMemo | None = None) -> torch.Tensor:
        return operator.merge(base, experts, parsed, MergeContext("t", names, "base", seed, memo, mask_draw))

    whole = merge(5)
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 47 * 4 * 5)  # runs of 5 rows, the last one shorter
    assert len(kernels.row_runs(base)) == 13
    assert torch.equal(merge(5), whole)
    for budget in (1 << 30, 3 * base.nbytes, 0):
        memo = SourceMemo(budget)
        for _ in range(2):
            assert torch.equal(merge(5, memo), whole)
    assert not torch.equal(merge(6), whole)  # the masks do depend on the seed
